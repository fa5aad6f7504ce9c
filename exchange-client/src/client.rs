//! A typed client of the whole API and of the event stream (reqwest, plain HTTP).
//!
//! Messages are signed here with the wallet key; the client fills `expiry` and `nonce`
//! only where the caller left them at 0.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256};
use alloy_signer_local::PrivateKeySigner;
use alloy_sol_types::Eip712Domain;
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    BatchItem, BookQuery, BookView, Deal, DealEvent, ErrorEnvelope, NodeInfo, OfferBatch, Outcome,
    ProfileView, SignedMessage,
};
use crate::error::ExchangeError;
use crate::sign::{self, Signed};
use crate::types::{
    BalanceProof, Cancel, EndpointReport, Extend, Offer, Preferences, Rating, Request, StatusReport,
};

fn transport(e: impl std::fmt::Display) -> ExchangeError {
    ExchangeError::Transport(e.to_string())
}

/// A client of one exchange node, optionally holding a wallet key to sign with.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    domain: Eip712Domain,
    proof_domain: ipsx_chain::ChannelDomain,
    key: Option<PrivateKeySigner>,
}

impl Client {
    /// A client of the node at `base_url` (e.g. `http://127.0.0.1:8700`) on `chain_id`,
    /// whose Centralizer is `centralizer` (the balance-proof domain).
    pub fn new(base_url: &str, chain_id: u64, centralizer: Address) -> Result<Self, ExchangeError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(transport)?;
        Ok(Self {
            http,
            base: base_url.trim_end_matches('/').to_owned(),
            domain: sign::exchange_domain(chain_id, centralizer),
            proof_domain: ipsx_chain::ChannelDomain {
                chain_id,
                centralizer,
            },
            key: None,
        })
    }

    /// A client of the node at `base_url` with the domain the node advertises at
    /// `GET /v1/info` (its chain id and Centralizer).
    pub async fn connect(base_url: &str) -> Result<Self, ExchangeError> {
        let probe = Self::new(base_url, 0, Address::ZERO)?;
        let info = probe.info().await?;
        Ok(Self {
            domain: sign::exchange_domain(info.chain_id, info.centralizer),
            proof_domain: ipsx_chain::ChannelDomain {
                chain_id: info.chain_id,
                centralizer: info.centralizer,
            },
            ..probe
        })
    }

    /// The same client sending through `http` (e.g. one bound to a local address).
    pub fn with_http(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    /// The EIP-712 domain this client signs exchange messages under.
    pub fn domain(&self) -> &Eip712Domain {
        &self.domain
    }

    /// The same client signing with `key`.
    pub fn with_key(mut self, key: PrivateKeySigner) -> Self {
        self.key = Some(key);
        self
    }

    /// The signing wallet, if any.
    pub fn wallet(&self) -> Option<Address> {
        self.key.as_ref().map(|k| k.address())
    }

    fn key(&self) -> Result<&PrivateKeySigner, ExchangeError> {
        self.key
            .as_ref()
            .ok_or_else(|| ExchangeError::BadSignature {
                reason: "this client has no wallet key".into(),
            })
    }

    /// Signs `msg` into the API envelope.
    pub fn sign<T: Signed + Clone>(&self, msg: &T) -> Result<SignedMessage<T>, ExchangeError> {
        Ok(SignedMessage {
            payload: msg.clone(),
            signature: sign::sign(msg, self.key()?, &self.domain)?,
        })
    }

    async fn answer<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ExchangeError> {
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(transport)?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).map_err(transport);
        }
        match serde_json::from_slice::<ErrorEnvelope>(&bytes) {
            Ok(e) => Err(ExchangeError::Remote {
                status,
                code: e.error.code,
                field: e.error.field,
                message: e.error.message,
            }),
            Err(_) => Err(ExchangeError::Remote {
                status,
                code: "http".into(),
                field: None,
                message: String::from_utf8_lossy(&bytes).chars().take(512).collect(),
            }),
        }
    }

    /// POSTs any JSON body (already signed or not) to `path`.
    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ExchangeError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(transport)?;
        Self::answer(resp).await
    }

    /// POSTs raw bytes to `path` (for tests of hostile input); returns status and body.
    pub async fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, String), ExchangeError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await.map_err(transport)?))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ExchangeError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .map_err(transport)?;
        Self::answer(resp).await
    }

    /// Signs and posts an offer.
    pub async fn post_offer(&self, offer: &Offer) -> Result<Outcome, ExchangeError> {
        self.post_json("/v1/offers", &self.sign(offer)?).await
    }

    /// Signs and posts many offers in one call; one result per offer.
    pub async fn post_offers(&self, offers: &[Offer]) -> Result<Vec<BatchItem>, ExchangeError> {
        let orders = offers
            .iter()
            .map(|o| self.sign(o))
            .collect::<Result<Vec<_>, _>>()?;
        self.post_json("/v1/offers/batch", &OfferBatch { orders })
            .await
    }

    /// Signs and posts a request.
    pub async fn post_request(&self, request: &Request) -> Result<Outcome, ExchangeError> {
        self.post_json("/v1/requests", &self.sign(request)?).await
    }

    /// Cancels an order's open part.
    pub async fn cancel(&self, order_id: u64) -> Result<Outcome, ExchangeError> {
        let (expiry, nonce) = fresh();
        let c = Cancel {
            wallet: self.key()?.address(),
            order_id,
            expiry,
            nonce,
        };
        self.post_json("/v1/cancel", &self.sign(&c)?).await
    }

    /// Signs and posts a status report.
    pub async fn report(&self, report: &StatusReport) -> Result<Outcome, ExchangeError> {
        self.post_json("/v1/reports", &self.sign(report)?).await
    }

    /// Signs and posts a side's WireGuard endpoint for a deal
    /// ([`Outcome::EndpointStored`]; the other side sees it as an `endpoint` event).
    pub async fn report_endpoint(&self, r: &EndpointReport) -> Result<Outcome, ExchangeError> {
        self.post_json("/v1/endpoints", &self.sign(r)?).await
    }

    /// Signs and posts a proposal to extend a deal to `e.new_end`
    /// ([`Outcome::Extend`]; `extended` once both sides proposed the same end).
    pub async fn extend(&self, e: &Extend) -> Result<Outcome, ExchangeError> {
        self.post_json("/v1/extensions", &self.sign(e)?).await
    }

    /// Signs and posts a rating.
    pub async fn rate(&self, rating: &Rating) -> Result<Outcome, ExchangeError> {
        self.post_json("/v1/ratings", &self.sign(rating)?).await
    }

    /// Signs and posts preferences.
    pub async fn set_preferences(&self, prefs: &Preferences) -> Result<Outcome, ExchangeError> {
        self.post_json("/v1/preferences", &self.sign(prefs)?).await
    }

    /// Signs (as the requester, Centralizer domain) and posts a balance proof.
    pub async fn post_proof(
        &self,
        deal_id: u64,
        channel_id: B256,
        cumulative_amount: u128,
    ) -> Result<Outcome, ExchangeError> {
        let mut proof = BalanceProof {
            deal_id,
            channel_id,
            cumulative_amount,
            signature: String::new(),
        };
        proof.signature = sign::sign_hash(self.key()?, &proof.digest(&self.proof_domain))?;
        self.post_json("/v1/proofs", &proof).await
    }

    /// The latest balance proof of a deal.
    pub async fn proof(&self, deal_id: u64) -> Result<BalanceProof, ExchangeError> {
        self.get(&format!("/v1/deals/{deal_id}/proof")).await
    }

    /// A snapshot of the book.
    pub async fn book(&self, q: &BookQuery) -> Result<BookView, ExchangeError> {
        let mut url = reqwest::Url::parse(&format!("{}/v1/book", self.base)).map_err(transport)?;
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(c) = q.country {
                pairs.append_pair("country", c.as_str());
            }
            if let Some(k) = q.kind {
                pairs.append_pair("type", k.as_str());
            }
            if let Some(p) = &q.max_price {
                pairs.append_pair("max_price", p);
            }
            if let Some(w) = q.wallet {
                pairs.append_pair("wallet", &w.to_string());
            }
            if let Some(l) = q.limit {
                pairs.append_pair("limit", &l.to_string());
            }
        }
        let resp = self.http.get(url).send().await.map_err(transport)?;
        Self::answer(resp).await
    }

    /// One deal.
    pub async fn deal(&self, id: u64) -> Result<Deal, ExchangeError> {
        self.get(&format!("/v1/deals/{id}")).await
    }

    /// A wallet's deals.
    pub async fn deals_of(&self, wallet: Address) -> Result<Vec<Deal>, ExchangeError> {
        self.get(&format!("/v1/wallets/{wallet}/deals")).await
    }

    /// A wallet's profile.
    pub async fn profile(&self, wallet: Address) -> Result<ProfileView, ExchangeError> {
        self.get(&format!("/v1/profiles/{wallet}")).await
    }

    /// The OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value, ExchangeError> {
        self.get("/v1/openapi.json").await
    }

    /// The node's chain id, Centralizer (its EIP-712 domain) and limits.
    pub async fn info(&self) -> Result<NodeInfo, ExchangeError> {
        self.get("/v1/info").await
    }

    /// Opens the wallet's deal-event stream after event `last_id` (0: from the start).
    pub async fn events(
        &self,
        wallet: Address,
        last_id: u64,
    ) -> Result<EventStream, ExchangeError> {
        let resp = self
            .http
            .get(format!("{}/v1/wallets/{wallet}/events", self.base))
            .header("last-event-id", last_id.to_string())
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(transport)?;
        if !resp.status().is_success() {
            return Err(Self::answer::<serde_json::Value>(resp)
                .await
                .err()
                .unwrap_or_else(|| transport("event stream refused")));
        }
        Ok(EventStream {
            body: Box::pin(resp.bytes_stream()),
            parser: SseParser::default(),
            ready: VecDeque::new(),
            last_id,
        })
    }
}

impl Client {
    /// Follows a wallet's deal events for good: reconnects after a dropped stream or a
    /// restarted node, resuming after the last event seen, so nothing is missed or seen
    /// twice. Gives up after `max_failures` consecutive failed connection attempts
    /// (backoff 100 ms doubling to 5 s).
    pub fn follow(&self, wallet: Address, last_id: u64, max_failures: u32) -> Follow {
        Follow {
            client: self.clone(),
            wallet,
            last_id,
            stream: None,
            failures: 0,
            max_failures,
        }
    }
}

/// A self-reconnecting event stream (see [`Client::follow`]).
#[derive(Debug)]
pub struct Follow {
    client: Client,
    wallet: Address,
    last_id: u64,
    stream: Option<EventStream>,
    failures: u32,
    max_failures: u32,
}

impl Follow {
    /// The id of the last event returned.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// The next event; `Err` once `max_failures` consecutive reconnections failed.
    pub async fn next(&mut self) -> Result<DealEvent, ExchangeError> {
        loop {
            if let Some(s) = &mut self.stream {
                match s.next().await {
                    Some(Ok(ev)) => {
                        self.failures = 0;
                        self.last_id = ev.id;
                        return Ok(ev);
                    }
                    // Closed or broken: reconnect from the last id.
                    Some(Err(_)) | None => self.stream = None,
                }
            }
            match self.client.events(self.wallet, self.last_id).await {
                Ok(s) => self.stream = Some(s),
                Err(e) => {
                    self.failures += 1;
                    if self.failures >= self.max_failures {
                        return Err(e);
                    }
                    let ms = 100u64.saturating_mul(1 << self.failures.min(6)).min(5_000);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
            }
        }
    }
}

/// A fresh (expiry, nonce): one hour ahead, nonce from the clock in nanoseconds.
pub fn fresh() -> (u64, u64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (
        now.as_secs() + 3600,
        u64::try_from(now.as_nanos()).unwrap_or(u64::MAX),
    )
}

type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// A wallet's deal events, in order; remembers the last id for resuming.
pub struct EventStream {
    body: ByteStream,
    parser: SseParser,
    ready: VecDeque<DealEvent>,
    last_id: u64,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("last_id", &self.last_id)
            .finish()
    }
}

impl EventStream {
    /// The id of the last event returned (resume from it with [`Client::events`]).
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// The next event; `None` when the server closed the stream.
    pub async fn next(&mut self) -> Option<Result<DealEvent, ExchangeError>> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                self.last_id = ev.id;
                return Some(Ok(ev));
            }
            match self.body.next().await? {
                Err(e) => return Some(Err(transport(e))),
                Ok(chunk) => {
                    for frame in self.parser.push(&chunk) {
                        if frame.event.as_deref() != Some("deal") {
                            continue;
                        }
                        match serde_json::from_str::<DealEvent>(&frame.data) {
                            Ok(ev) => self.ready.push_back(ev),
                            Err(e) => return Some(Err(transport(format!("bad event: {e}")))),
                        }
                    }
                }
            }
        }
    }
}

/// One server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseFrame {
    /// `id:` field.
    pub id: Option<String>,
    /// `event:` field.
    pub event: Option<String>,
    /// `data:` lines joined by `\n`.
    pub data: String,
}

/// A sans-IO parser of the `text/event-stream` format (bounded buffer).
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    frame: SseFrame,
    has_data: bool,
}

/// Longest line the parser keeps (longer lines are dropped).
const MAX_LINE: usize = 1 << 20;

impl SseParser {
    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseFrame> {
        let mut out = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                self.line_done(&String::from_utf8_lossy(line), &mut out);
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        out
    }

    fn line_done(&mut self, line: &str, out: &mut Vec<SseFrame>) {
        if line.is_empty() {
            if self.has_data {
                out.push(std::mem::take(&mut self.frame));
            }
            self.frame = SseFrame::default();
            self.has_data = false;
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "id" => self.frame.id = Some(value.to_owned()),
            "event" => self.frame.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.frame.data.push('\n');
                }
                self.frame.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_frames_split_anywhere() {
        let text = b": keep-alive\n\nid: 1\nevent: deal\ndata: {\"a\":1}\n\nid: 2\r\nevent: deal\r\ndata: x\r\ndata: y\r\n\r\n";
        for cut in 0..text.len() {
            let mut p = SseParser::default();
            let mut frames = p.push(&text[..cut]);
            frames.extend(p.push(&text[cut..]));
            assert_eq!(frames.len(), 2, "cut at {cut}");
            assert_eq!(frames[0].id.as_deref(), Some("1"));
            assert_eq!(frames[0].data, "{\"a\":1}");
            assert_eq!(frames[1].data, "x\ny");
        }
        let mut p = SseParser::default();
        assert!(p.push(&vec![b'x'; 3 * MAX_LINE]).is_empty(), "bounded");
    }
}
