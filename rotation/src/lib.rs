//! Exit selection for the ipsx gateway.
//!
//! Owns: what an exit is ([`ExitAttributes`]) and what a request asks for ([`Filter`]),
//! the rotation policies, sticky sessions, rate limits and ban cool-downs.
//! Does not own: sockets, tunnels or config parsing; the core is sans-IO.

mod attrs;

pub use attrs::{
    AttrError, CountryCode, ExitAttributes, ExitKind, Filter, parse_asn, parse_place,
};
