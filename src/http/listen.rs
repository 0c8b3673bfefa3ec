//! Binding the listen address and starting the actix server over plain HTTP or HTTPS.

use std::net::TcpListener;

use actix_web::{dev::Server, web, App, HttpServer};

use super::{access_log, configure, AppState};
use crate::config::HttpConfig;

/// Errors setting up the HTTP server (request errors are [`super::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TLS certificate or key cannot be used (`http.tls_*`).
    #[error("HTTPS (http.tls_cert_file, http.tls_key_file): {0}")]
    Tls(#[source] crate::tls::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} (http.listen / --listen): {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Binds the listen address. Separate from [`serve`] so the caller learns the bound
/// address (port 0 picks one) before it builds the [`AppState`] that reports it.
pub fn listen(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).map_err(|source| Error::Bind {
        addr: addr.to_owned(),
        source,
    })
}

/// Starts serving on `listener`; the returned server resolves when it has stopped.
/// It does not handle signals: the caller stops it through `Server::handle()` so that
/// the shutdown order stays in one place (main).
pub fn serve(listener: TcpListener, config: &HttpConfig, state: AppState) -> Result<Server> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| config.listen.clone(), |a| a.to_string());
    crate::metrics::register_all();
    let state = web::Data::new(state);
    let routes = configure(state);
    let server = HttpServer::new(move || App::new().wrap_fn(access_log).configure(routes.clone()))
        .max_connections(config.max_connections)
        .disable_signals()
        .shutdown_timeout(config.shutdown_timeout.as_secs_f64().ceil() as u64);
    let server = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => {
            let tls = crate::tls::server_config(cert, key).map_err(Error::Tls)?;
            server.listen_rustls_0_23(listener, tls)
        }
        _ => server.listen(listener),
    }
    .map_err(|source| Error::Bind { addr, source })?;
    Ok(server.run())
}
