//! Geography verified, not typed: country and ASN of an address from MaxMind-format
//! databases (the `maxminddb` crate), and the check of an offer's claims against them.
//! The exchange checks offers with it; the gateway's market re-checks the address its
//! rented exits really leave from with the same code.
//!
//! Record layouts read: country `{"country_code": "de"}` (the ip-location-db project's
//! country mmdb packages) or `{"country": {"iso_code": "DE"}}` (GeoLite2-Country); ASN
//! `{"autonomous_system_number": N}` (GeoLite2-ASN, and what `scripts/make-geo-mmdb.py`
//! writes from ip-location-db's ASN tables).
//!
//! An address the database does not know is not a contradiction: the offer is accepted
//! and shown as [`GeoStatus::Unverified`]. Addresses in loopback, private, link-local,
//! CGNAT, documentation and other special ranges are refused by [`check_public`] unless
//! the node runs with the dev flag `allow_private_addresses`.

use std::net::IpAddr;
use std::path::Path;

use maxminddb::Reader;
use serde::{Deserialize, Serialize};

use crate::error::ExchangeError;
use ipsx_rotation::CountryCode;

/// The demo country database of `ipsx up`: 127.0.0.2-9 in de, de, us, us, fr, fr, jp,
/// jp; 127.0.0.40-47 in br (for tests of a misplaced exit). Built by
/// `scripts/make-geo-mmdb.py demo exchange-client/geo`.
pub const DEMO_COUNTRY_MMDB: &[u8] = include_bytes!("../geo/demo-country.mmdb");
/// The demo ASN database: 127.0.0.x is AS(64496 + x) for x in 2..=9; 127.0.0.40-47 is
/// AS64600.
pub const DEMO_ASN_MMDB: &[u8] = include_bytes!("../geo/demo-asn.mmdb");

/// What the databases say of one address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// Country, when the country database knows the address.
    pub country: Option<CountryCode>,
    /// Autonomous system, when the ASN database knows the address.
    pub asn: Option<u32>,
}

/// How far an offer's geography was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GeoStatus {
    /// The database knows the address and agrees with the country (and the ASN when
    /// the offer names one).
    Verified,
    /// No database is configured, or it does not know the address: taken on trust.
    Unverified,
}

/// A contradiction between a claim and the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// `country` or `asn`.
    pub field: &'static str,
    /// What was claimed.
    pub claimed: String,
    /// What the database says.
    pub found: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` claims {} but the GeoIP database places the address in {}",
            self.field, self.claimed, self.found
        )
    }
}

impl From<Mismatch> for ExchangeError {
    fn from(m: Mismatch) -> Self {
        ExchangeError::Geo {
            field: m.field,
            reason: m.to_string(),
        }
    }
}

#[derive(Deserialize)]
struct CountryRecord<'a> {
    #[serde(default, borrow)]
    country_code: Option<&'a str>,
    #[serde(default, borrow)]
    country: Option<IsoCode<'a>>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(default, borrow)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct AsnRecord {
    #[serde(default)]
    autonomous_system_number: Option<u32>,
}

/// The country and ASN databases (either may be absent).
#[derive(Default)]
pub struct GeoDb {
    country: Option<Reader<Vec<u8>>>,
    asn: Option<Reader<Vec<u8>>>,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDb")
            .field("country", &self.country.is_some())
            .field("asn", &self.asn.is_some())
            .finish()
    }
}

fn reader(key: &str, bytes: Vec<u8>) -> Result<Reader<Vec<u8>>, ExchangeError> {
    Reader::from_source(bytes).map_err(|e| ExchangeError::Config {
        key: key.into(),
        reason: format!("not a MaxMind DB: {e}"),
    })
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, ExchangeError> {
    std::fs::read(path).map_err(|e| ExchangeError::Config {
        key: key.into(),
        reason: format!("{}: {e}", path.display()),
    })
}

impl GeoDb {
    /// No database: every address is [`GeoStatus::Unverified`].
    pub fn none() -> Self {
        Self::default()
    }

    /// Databases from mmdb bytes; errors name `geoip_country` or `geoip_asn`.
    pub fn from_bytes(
        country: Option<Vec<u8>>,
        asn: Option<Vec<u8>>,
    ) -> Result<Self, ExchangeError> {
        Ok(Self {
            country: country.map(|b| reader("geoip_country", b)).transpose()?,
            asn: asn.map(|b| reader("geoip_asn", b)).transpose()?,
        })
    }

    /// Databases from files (the config keys `geoip_country` and `geoip_asn`).
    pub fn open(country: Option<&Path>, asn: Option<&Path>) -> Result<Self, ExchangeError> {
        Self::from_bytes(
            country.map(|p| read("geoip_country", p)).transpose()?,
            asn.map(|p| read("geoip_asn", p)).transpose()?,
        )
    }

    /// The demo databases of `ipsx up` (see [`DEMO_COUNTRY_MMDB`]).
    pub fn demo() -> Result<Self, ExchangeError> {
        Self::from_bytes(
            Some(DEMO_COUNTRY_MMDB.to_vec()),
            Some(DEMO_ASN_MMDB.to_vec()),
        )
    }

    /// Whether any database is loaded.
    pub fn is_empty(&self) -> bool {
        self.country.is_none() && self.asn.is_none()
    }

    /// What the databases say of `ip` (a record that does not decode counts as absent).
    pub fn lookup(&self, ip: IpAddr) -> Place {
        let ip = ipsx_egress::canonical(ip);
        let country = self.country.as_ref().and_then(|r| {
            let rec = r.lookup(ip).ok()?.decode::<CountryRecord<'_>>().ok()??;
            let code = rec
                .country_code
                .or_else(|| rec.country.and_then(|c| c.iso_code))?;
            code.parse::<CountryCode>().ok()
        });
        let asn = self.asn.as_ref().and_then(|r| {
            r.lookup(ip)
                .ok()?
                .decode::<AsnRecord>()
                .ok()??
                .autonomous_system_number
        });
        Place { country, asn }
    }

    /// Checks a claimed country (and ASN, when one is claimed) for `ip`.
    pub fn check(
        &self,
        ip: IpAddr,
        country: CountryCode,
        asn: Option<u32>,
    ) -> Result<GeoStatus, Mismatch> {
        judge(self.lookup(ip), country, asn)
    }
}

/// The verdict on claims given what the database found (pure; the core of
/// [`GeoDb::check`]).
pub fn judge(found: Place, country: CountryCode, asn: Option<u32>) -> Result<GeoStatus, Mismatch> {
    if let Some(f) = found.country
        && f != country
    {
        return Err(Mismatch {
            field: "country",
            claimed: country.to_string(),
            found: f.to_string(),
        });
    }
    if let (Some(claimed), Some(f)) = (asn, found.asn)
        && claimed != f
    {
        return Err(Mismatch {
            field: "asn",
            claimed: format!("AS{claimed}"),
            found: format!("AS{f}"),
        });
    }
    let asn_known = asn.is_none() || found.asn.is_some();
    Ok(if found.country.is_some() && asn_known {
        GeoStatus::Verified
    } else {
        GeoStatus::Unverified
    })
}

/// Refuses an address in a special range (loopback, private, link-local, CGNAT,
/// documentation, ...) unless `allow_private`; the error names `field`.
pub fn check_public(field: &str, ip: IpAddr, allow_private: bool) -> Result<(), ExchangeError> {
    match ipsx_egress::special_range(ip) {
        Some(range) if !allow_private => Err(ExchangeError::invalid(
            field,
            format!(
                "{ip} is in a {range} range, not reachable from the internet (the exchange's `allow_private_addresses` dev flag allows it)"
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn cc(s: &str) -> CountryCode {
        s.parse().unwrap()
    }

    #[test]
    fn the_demo_database_maps_the_demo_exits() {
        let db = GeoDb::demo().unwrap();
        for (last, country) in [
            (2, "de"),
            (3, "de"),
            (4, "us"),
            (5, "us"),
            (6, "fr"),
            (7, "fr"),
            (8, "jp"),
            (9, "jp"),
            (40, "br"),
            (47, "br"),
        ] {
            let ip: IpAddr = format!("127.0.0.{last}").parse().unwrap();
            let p = db.lookup(ip);
            assert_eq!(p.country, Some(cc(country)), "{ip}");
            let asn = if last < 40 { 64496 + last } else { 64600 };
            assert_eq!(p.asn, Some(asn), "{ip}");
        }
        for absent in ["127.0.0.1", "127.0.0.10", "127.0.0.48", "8.8.8.8", "::1"] {
            assert_eq!(
                db.lookup(absent.parse().unwrap()),
                Place::default(),
                "{absent}"
            );
        }
        // IPv4-mapped IPv6 is looked up as its IPv4 address.
        assert_eq!(
            db.lookup("::ffff:127.0.0.4".parse().unwrap()).country,
            Some(cc("us"))
        );
    }

    #[test]
    fn claims_are_judged_against_the_database() {
        let db = GeoDb::demo().unwrap();
        let de: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(db.check(de, cc("de"), None), Ok(GeoStatus::Verified));
        assert_eq!(db.check(de, cc("de"), Some(64498)), Ok(GeoStatus::Verified));
        let e = db.check(de, cc("fr"), None).unwrap_err();
        assert_eq!(e.field, "country");
        let e = ExchangeError::from(db.check(de, cc("de"), Some(3320)).unwrap_err());
        assert_eq!(e.field().as_deref(), Some("asn"));
        assert_eq!(e.http_status(), 422);
        assert!(e.to_string().contains("AS64498"), "{e}");
        let absent: IpAddr = "127.0.0.20".parse().unwrap();
        assert_eq!(
            db.check(absent, cc("fr"), Some(1)),
            Ok(GeoStatus::Unverified)
        );
        assert_eq!(
            GeoDb::none().check(de, cc("fr"), None),
            Ok(GeoStatus::Unverified)
        );
    }

    /// The database `scripts/install-geo.sh` installs (run by `make test`), read with
    /// the same code: well-known addresses land where they are; the ASN database only
    /// when built (`IPSX_GEO_ASN=1`).
    #[test]
    fn the_installed_ip_location_db_database_reads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../geo");
        let country = dir.join("geolite2-country.mmdb");
        assert!(
            country.is_file(),
            "{} missing: run scripts/install-geo.sh",
            country.display()
        );
        let asn = dir.join("asn.mmdb");
        let db = GeoDb::open(Some(&country), asn.is_file().then_some(asn.as_path())).unwrap();
        let google: IpAddr = "8.8.8.8".parse().unwrap();
        assert_eq!(db.lookup(google).country, Some(cc("us")));
        assert!(
            db.lookup("2a00:1450:4001::1".parse().unwrap())
                .country
                .is_some()
        );
        assert_eq!(db.lookup("127.0.0.1".parse().unwrap()).country, None);
        assert!(matches!(
            db.check(google, cc("fr"), None),
            Err(Mismatch {
                field: "country",
                ..
            })
        ));
        if asn.is_file() {
            assert_eq!(db.lookup("1.1.1.1".parse().unwrap()).asn, Some(13335));
        }
    }

    #[test]
    fn a_file_that_is_not_a_database_names_the_key() {
        let e = GeoDb::from_bytes(None, Some(b"not a db".to_vec())).unwrap_err();
        assert_eq!(e.field().as_deref(), Some("geoip_asn"));
        let e = GeoDb::open(Some(Path::new("/nonexistent/x.mmdb")), None).unwrap_err();
        assert_eq!(e.field().as_deref(), Some("geoip_country"));
    }

    #[test]
    fn special_addresses_are_refused_unless_allowed() {
        for ip in [
            "127.0.0.2",
            "10.0.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "192.0.2.1",
            "::1",
            "fe80::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let e = check_public("wg_endpoint", ip, false).unwrap_err();
            assert_eq!(e.field().as_deref(), Some("wg_endpoint"), "{ip}");
            check_public("wg_endpoint", ip, true).unwrap();
        }
        for ip in ["8.8.8.8", "2a00:1450::1"] {
            check_public("exit_address", ip.parse().unwrap(), false).unwrap();
        }
    }

    proptest! {
        /// Lookups of any address never panic, and the judge never verifies a claim
        /// the database contradicts.
        #[test]
        fn lookups_and_judgements_are_total(raw in any::<u128>(), v4 in any::<u32>(), claim in 0usize..4) {
            let db = GeoDb::demo().unwrap();
            let claims = ["de", "us", "br", "gb"];
            let claimed = cc(claims[claim]);
            for ip in [IpAddr::from(raw.to_be_bytes()), IpAddr::from(v4.to_be_bytes())] {
                let found = db.lookup(ip);
                match judge(found, claimed, None) {
                    Ok(GeoStatus::Verified) => prop_assert_eq!(found.country, Some(claimed)),
                    Ok(GeoStatus::Unverified) => prop_assert!(found.country.is_none()),
                    Err(m) => prop_assert!(found.country.is_some() && m.field == "country"),
                }
            }
        }
    }
}
