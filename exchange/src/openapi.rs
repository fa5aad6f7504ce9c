//! The OpenAPI 3.1 document of the API, served at `GET /v1/openapi.json`. A test checks
//! that every documented route is served and that the message schemas list exactly the
//! fields the server accepts.

use alloy_sol_types::SolStruct;
use serde_json::{Value, json};

use crate::sign::{self, typed};

/// Every route: (method, path, summary, request body schema, success status).
pub const ROUTES: &[(&str, &str, &str, Option<&str>, u16)] = &[
    ("get", "/v1/health", "Liveness: `ok`.", None, 200),
    (
        "get",
        "/v1/openapi.json",
        "This document; `x-eip712` holds the typed-data definitions every signed message uses.",
        None,
        200,
    ),
    (
        "get",
        "/v1/info",
        "The node's chain id and Centralizer (the EIP-712 domain's chainId and verifyingContract), its flood limits and GeoIP checks.",
        None,
        200,
    ),
    (
        "post",
        "/v1/offers",
        "Post one signed offer (Offer Orders List); it may fill resting requests at once.",
        Some("SignedOffer"),
        201,
    ),
    (
        "post",
        "/v1/offers/batch",
        "Post many signed offers; one result (ok or error) per offer, in order.",
        Some("OfferBatch"),
        200,
    ),
    (
        "post",
        "/v1/requests",
        "Post a signed request; accepted only if the on-chain balance minus holds covers its maximum cost; fills at once as far as the book allows, the rest rests until expiry.",
        Some("SignedRequest"),
        201,
    ),
    (
        "post",
        "/v1/cancel",
        "Cancel the open part of one's own order; a request's unfilled part is released.",
        Some("SignedCancel"),
        200,
    ),
    (
        "get",
        "/v1/book",
        "The order book: offers in matching order and resting requests. Query: country, type, max_price, wallet, limit.",
        None,
        200,
    ),
    (
        "get",
        "/v1/deals/{id}",
        "One deal with its terms, statuses and history.",
        None,
        200,
    ),
    (
        "get",
        "/v1/deals/{id}/proof",
        "The latest balance proof of a deal (what the provider claims on chain).",
        None,
        200,
    ),
    (
        "post",
        "/v1/reports",
        "A side's signed status report for a deal (agreement protocol input).",
        Some("SignedStatusReport"),
        200,
    ),
    (
        "post",
        "/v1/endpoints",
        "A side's signed WireGuard endpoint for a deal (NAT traversal): recorded on the deal (requester_endpoint; the provider's report sets path = direct|punched|relayed) and sent to both parties as an `endpoint` event.",
        Some("SignedEndpointReport"),
        200,
    ),
    (
        "post",
        "/v1/proofs",
        "A requester's balance proof for a deal's payment channel (Centralizer EIP-712 domain).",
        Some("BalanceProof"),
        200,
    ),
    (
        "post",
        "/v1/extensions",
        "A party's signed proposal to extend a running deal to new_end (after its end, at most 30 days after its start); a requester's proposal holds the added value. When both parties proposed the same new_end the deal is extended (same exit, same price; end, value and deadlines move).",
        Some("SignedExtend"),
        200,
    ),
    (
        "post",
        "/v1/ratings",
        "Rate the counterparty of an ended deal (1-5, weighted by deal value).",
        Some("SignedRating"),
        200,
    ),
    (
        "post",
        "/v1/preferences",
        "Set one's matching preferences.",
        Some("SignedPreferences"),
        200,
    ),
    (
        "get",
        "/v1/wallets/{address}/deals",
        "Deals of a wallet, oldest first.",
        None,
        200,
    ),
    (
        "get",
        "/v1/wallets/{address}/events",
        "Server-sent events of a wallet's deals (`event: deal`, `id` = event id); resume with `Last-Event-ID` or `?after=`.",
        None,
        200,
    ),
    (
        "get",
        "/v1/profiles/{address}",
        "A wallet's profile: rating, deal counts, preferences, funds held.",
        None,
        200,
    ),
];

fn s(t: &str) -> Value {
    json!({ "type": t })
}

fn amount() -> Value {
    json!({ "type": "string", "pattern": "^[0-9]{1,39}$", "description": "token base units, decimal" })
}

fn address() -> Value {
    json!({ "type": "string", "pattern": "^0x[0-9a-fA-F]{40}$" })
}

fn strings() -> Value {
    json!({ "type": "array", "items": { "type": "string" } })
}

fn object(required: &[&str], props: Value) -> Value {
    json!({ "type": "object", "additionalProperties": false, "required": required, "properties": props })
}

fn signed(schema: &str) -> Value {
    object(
        &["payload", "signature"],
        json!({
            "payload": { "$ref": format!("#/components/schemas/{schema}") },
            "signature": { "type": "string", "description": "EIP-712 signature, 0x-hex r||s||v (65 bytes) of the payload as the typed struct `x-eip712.types` names, domain (\"IPSX Exchange\", \"1\", chainId, verifyingContract = the node's Centralizer; see GET /v1/info)" }
        }),
    )
}

/// Component schemas of the messages.
pub fn schemas() -> Value {
    json!({
        "Offer": object(
            &["provider", "exit_address", "country", "type", "protocols", "price_per_ip_second", "min_duration_s", "max_duration_s", "capacity", "wg_endpoint", "wg_public_key", "expiry", "nonce"],
            json!({
                "provider": address(), "exit_address": s("string"), "country": s("string"),
                "region": s("string"), "city": s("string"),
                "asn": { "oneOf": [s("integer"), { "type": "string", "pattern": "^(AS|as)?[0-9]+$" }] },
                "type": { "enum": ["residential", "mobile", "datacenter"] },
                "protocols": { "type": "array", "items": { "enum": ["http", "https", "smtp", "any"] } },
                "price_per_ip_second": amount(), "min_duration_s": s("integer"), "max_duration_s": s("integer"),
                "capacity": s("integer"), "wg_endpoint": s("string"), "wg_public_key": s("string"),
                "expiry": s("integer"), "nonce": s("integer")
            }),
        ),
        "Request": object(
            &["requester", "count", "duration_s", "max_price_per_ip_second", "wg_public_key", "expiry", "nonce"],
            json!({
                "requester": address(), "count": s("integer"),
                "countries": strings(), "regions": strings(), "cities": strings(),
                "asns": { "type": "array", "items": { "oneOf": [s("integer"), { "type": "string", "pattern": "^(AS|as)?[0-9]+$" }] } }, "types": strings(), "protocols": strings(),
                "min_rating": s("integer"),
                "diversity": { "enum": ["none", "distinct_subnet", "distinct_provider"] },
                "exclude_providers": { "type": "array", "maxItems": 16, "items": address() },
                "duration_s": { "type": "integer", "minimum": 5, "maximum": 2_592_000 },
                "max_price_per_ip_second": amount(), "wg_public_key": s("string"),
                "expiry": s("integer"), "nonce": s("integer")
            }),
        ),
        "Cancel": object(&["wallet", "order_id", "expiry", "nonce"], json!({
            "wallet": address(), "order_id": s("integer"), "expiry": s("integer"), "nonce": s("integer")
        })),
        "StatusReport": object(&["wallet", "deal_id", "status", "expiry", "nonce"], json!({
            "wallet": address(), "deal_id": s("integer"),
            "status": { "enum": ["accepted", "active", "completed", "failed", "rejected"] },
            "reason": s("string"), "expiry": s("integer"), "nonce": s("integer")
        })),
        "EndpointReport": object(&["wallet", "deal_id", "endpoint", "path", "expiry", "nonce"], json!({
            "wallet": address(), "deal_id": s("integer"),
            "endpoint": { "type": "string", "description": "ip:port ([ip]:port for IPv6); signed as that string" },
            "path": { "enum": ["direct", "punched", "relayed"] },
            "expiry": s("integer"), "nonce": s("integer")
        })),
        "Extend": object(&["wallet", "deal_id", "new_end", "expiry", "nonce"], json!({
            "wallet": address(), "deal_id": s("integer"), "new_end": s("integer"),
            "expiry": s("integer"), "nonce": s("integer")
        })),
        "Rating": object(&["wallet", "deal_id", "score", "expiry", "nonce"], json!({
            "wallet": address(), "deal_id": s("integer"), "score": { "type": "integer", "minimum": 1, "maximum": 5 },
            "expiry": s("integer"), "nonce": s("integer")
        })),
        "Preferences": object(&["wallet", "expiry", "nonce"], json!({
            "wallet": address(), "min_counterparty_rating": s("integer"), "expiry": s("integer"), "nonce": s("integer")
        })),
        "BalanceProof": object(&["deal_id", "channel_id", "cumulative_amount", "signature"], json!({
            "deal_id": s("integer"), "channel_id": s("string"), "cumulative_amount": amount(),
            "signature": { "type": "string", "description": "requester's EIP-712 signature of BalanceProof(bytes32 channelId,uint256 cumulativeAmount), domain (\"IPSX Centralizer\", \"1\", chainId, centralizer)" }
        })),
        "SignedOffer": signed("Offer"),
        "SignedRequest": signed("Request"),
        "SignedCancel": signed("Cancel"),
        "SignedStatusReport": signed("StatusReport"),
        "SignedRating": signed("Rating"),
        "SignedExtend": signed("Extend"),
        "SignedEndpointReport": signed("EndpointReport"),
        "SignedPreferences": signed("Preferences"),
        "OfferBatch": object(&["orders"], json!({ "orders": { "type": "array", "items": { "$ref": "#/components/schemas/SignedOffer" } } })),
        "Error": object(&["error"], json!({ "error": object(&["code", "message"], json!({
            "code": s("string"), "field": s("string"), "message": s("string")
        })) })),
    })
}

/// `(type, name)` of each member of a typed struct, from its EIP-712 root type string
/// (`Cancel(address wallet,uint64 orderId,...)`).
fn members(root: &str) -> Vec<Value> {
    let inner = root
        .split_once('(')
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_default();
    inner
        .split(',')
        .filter_map(|m| m.split_once(' '))
        .map(|(ty, name)| json!({ "name": name, "type": ty }))
        .collect()
}

/// Where each typed member comes from in the JSON payload, and its value when the
/// payload leaves the field out: `(struct, member, payload field, default, encoding)`.
/// Encodings: `text` (the JSON string as is), `number`, `decimal` (a decimal string,
/// for uint256), `address`, `base64_bytes32` (the 32 decoded bytes), `list`.
pub const MEMBER_SOURCES: &[(&str, &str, &str, &str, &str)] = &[
    ("Offer", "provider", "provider", "", "address"),
    ("Offer", "exitAddress", "exit_address", "", "text"),
    ("Offer", "country", "country", "", "text"),
    ("Offer", "region", "region", "\"\"", "text"),
    ("Offer", "city", "city", "\"\"", "text"),
    ("Offer", "asn", "asn", "0", "number"),
    ("Offer", "exitType", "type", "", "text"),
    ("Offer", "protocols", "protocols", "", "list"),
    (
        "Offer",
        "pricePerIpSecond",
        "price_per_ip_second",
        "",
        "decimal",
    ),
    ("Offer", "minDurationS", "min_duration_s", "", "number"),
    ("Offer", "maxDurationS", "max_duration_s", "", "number"),
    ("Offer", "capacity", "capacity", "", "number"),
    ("Offer", "wgEndpoint", "wg_endpoint", "", "text"),
    (
        "Offer",
        "wgPublicKey",
        "wg_public_key",
        "",
        "base64_bytes32",
    ),
    ("Offer", "expiry", "expiry", "", "number"),
    ("Offer", "nonce", "nonce", "", "number"),
    ("Request", "requester", "requester", "", "address"),
    ("Request", "count", "count", "", "number"),
    ("Request", "countries", "countries", "[]", "list"),
    ("Request", "regions", "regions", "[]", "list"),
    ("Request", "cities", "cities", "[]", "list"),
    ("Request", "asns", "asns", "[]", "list"),
    ("Request", "types", "types", "[]", "list"),
    ("Request", "protocols", "protocols", "[]", "list"),
    ("Request", "minRating", "min_rating", "0", "number"),
    ("Request", "diversity", "diversity", "\"none\"", "text"),
    (
        "Request",
        "excludeProviders",
        "exclude_providers",
        "[]",
        "list",
    ),
    ("Request", "durationS", "duration_s", "", "number"),
    (
        "Request",
        "maxPricePerIpSecond",
        "max_price_per_ip_second",
        "",
        "decimal",
    ),
    (
        "Request",
        "wgPublicKey",
        "wg_public_key",
        "",
        "base64_bytes32",
    ),
    ("Request", "expiry", "expiry", "", "number"),
    ("Request", "nonce", "nonce", "", "number"),
    ("Cancel", "wallet", "wallet", "", "address"),
    ("Cancel", "orderId", "order_id", "", "number"),
    ("Cancel", "expiry", "expiry", "", "number"),
    ("Cancel", "nonce", "nonce", "", "number"),
    ("StatusReport", "wallet", "wallet", "", "address"),
    ("StatusReport", "dealId", "deal_id", "", "number"),
    ("StatusReport", "status", "status", "", "text"),
    ("StatusReport", "reason", "reason", "\"\"", "text"),
    ("StatusReport", "expiry", "expiry", "", "number"),
    ("StatusReport", "nonce", "nonce", "", "number"),
    ("EndpointReport", "wallet", "wallet", "", "address"),
    ("EndpointReport", "dealId", "deal_id", "", "number"),
    ("EndpointReport", "endpoint", "endpoint", "", "text"),
    ("EndpointReport", "path", "path", "", "text"),
    ("EndpointReport", "expiry", "expiry", "", "number"),
    ("EndpointReport", "nonce", "nonce", "", "number"),
    ("Extend", "wallet", "wallet", "", "address"),
    ("Extend", "dealId", "deal_id", "", "number"),
    ("Extend", "newEnd", "new_end", "", "number"),
    ("Extend", "expiry", "expiry", "", "number"),
    ("Extend", "nonce", "nonce", "", "number"),
    ("Rating", "wallet", "wallet", "", "address"),
    ("Rating", "dealId", "deal_id", "", "number"),
    ("Rating", "score", "score", "", "number"),
    ("Rating", "expiry", "expiry", "", "number"),
    ("Rating", "nonce", "nonce", "", "number"),
    ("Preferences", "wallet", "wallet", "", "address"),
    (
        "Preferences",
        "minCounterpartyRating",
        "min_counterparty_rating",
        "0",
        "number",
    ),
    ("Preferences", "expiry", "expiry", "", "number"),
    ("Preferences", "nonce", "nonce", "", "number"),
];

/// The typed-data definitions of every signed message (EIP-712), for wallet libraries:
/// the domain (chainId and verifyingContract come from `GET /v1/info`), the types as
/// `eth_signTypedData_v4` takes them, which API route carries each, and how each member
/// is filled from the JSON payload (field, default when absent, encoding).
pub fn typed_data() -> Value {
    let structs: [(&str, String, &str); 8] = [
        (
            "Offer",
            typed::Offer::eip712_root_type().into_owned(),
            "/v1/offers",
        ),
        (
            "Request",
            typed::Request::eip712_root_type().into_owned(),
            "/v1/requests",
        ),
        (
            "Cancel",
            typed::Cancel::eip712_root_type().into_owned(),
            "/v1/cancel",
        ),
        (
            "StatusReport",
            typed::StatusReport::eip712_root_type().into_owned(),
            "/v1/reports",
        ),
        (
            "EndpointReport",
            typed::EndpointReport::eip712_root_type().into_owned(),
            "/v1/endpoints",
        ),
        (
            "Extend",
            typed::Extend::eip712_root_type().into_owned(),
            "/v1/extensions",
        ),
        (
            "Rating",
            typed::Rating::eip712_root_type().into_owned(),
            "/v1/ratings",
        ),
        (
            "Preferences",
            typed::Preferences::eip712_root_type().into_owned(),
            "/v1/preferences",
        ),
    ];
    let mut types = serde_json::Map::new();
    types.insert(
        "EIP712Domain".into(),
        json!([
            { "name": "name", "type": "string" },
            { "name": "version", "type": "string" },
            { "name": "chainId", "type": "uint256" },
            { "name": "verifyingContract", "type": "address" }
        ]),
    );
    let mut messages = serde_json::Map::new();
    for (name, root, route) in &structs {
        types.insert((*name).into(), Value::Array(members(root)));
        let sources: Vec<Value> = MEMBER_SOURCES
            .iter()
            .filter(|(s, ..)| s == name)
            .map(|(_, member, field, default, encoding)| {
                let mut v = json!({ "member": member, "field": field, "encoding": encoding });
                if !default.is_empty() {
                    v["default"] = serde_json::from_str(default).unwrap_or(Value::Null);
                }
                v
            })
            .collect();
        messages.insert(
            (*name).into(),
            json!({ "route": route, "encodeType": root, "members": sources }),
        );
    }
    json!({
        "domain": {
            "name": sign::DOMAIN_NAME,
            "version": sign::DOMAIN_VERSION,
            "chainId": "GET /v1/info -> chain_id",
            "verifyingContract": "GET /v1/info -> centralizer"
        },
        "primaryTypes": structs.iter().map(|(n, ..)| *n).collect::<Vec<_>>(),
        "types": types,
        "messages": messages,
        "signature": "secp256k1 over the EIP-712 digest, 0x-hex r||s||v, v 27 or 28, low s"
    })
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, body, status) in ROUTES {
        let mut op = json!({
            "summary": summary,
            "responses": {
                status.to_string(): { "description": "success" },
                "4XX": { "description": "refused; the body names the field", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } },
                "503": { "description": "chain or journal unavailable" }
            }
        });
        if let Some(b) = body {
            op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{b}") } } } });
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "ipsx exchange", "version": "1", "description": "Order book, matching, deal book and agreement protocol of the IP Sharing Exchange. Writes are EIP-712 signed by the wallet; the signer is the identity." },
        "paths": paths,
        "components": { "schemas": schemas() },
        "x-eip712": typed_data()
    })
}
