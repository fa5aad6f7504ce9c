//! `ipsx echo`: the demo/test target that reports the caller's address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// Runs the echo target; `country_map` entries are `IP=COUNTRY`.
pub(crate) async fn run(
    listen: SocketAddr,
    country_map: Vec<String>,
    fixed_body: Option<usize>,
) -> Result<(), String> {
    let mut countries = HashMap::new();
    for entry in country_map {
        let (ip, cc) = entry
            .split_once('=')
            .ok_or_else(|| format!("--country-map `{entry}`: expected IP=COUNTRY"))?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("--country-map `{entry}`: bad IP address"))?;
        countries.insert(ip, cc.to_owned());
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("echo: cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("echo listening on http://{addr}");
    ipsx_gateway::echo::serve_echo_with(listener, countries, fixed_body).await;
    Ok(())
}
