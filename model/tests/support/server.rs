//! A local HTTP server for the download tests: one handler for every request, each one recorded.

use std::sync::{Arc, Mutex};

use axum::extract::Request;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Router;

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The path as sent, still percent-encoded.
    pub path: String,
    pub headers: HeaderMap,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// A server on `127.0.0.1` with an OS-chosen port; stops when dropped.
pub struct Server {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    log: Arc<Mutex<Vec<Recorded>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Server {
    pub fn start(handler: impl Fn(&Recorded) -> Response + Send + Sync + 'static) -> Self {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let app_log = log.clone();
        let app = Router::new().fallback(move |request: Request| {
            let recorded = Recorded {
                method: request.method().to_string(),
                path: request.uri().path().to_string(),
                headers: request.headers().clone(),
            };
            app_log.lock().unwrap().push(recorded.clone());
            let response = handler(&recorded);
            async move { response }
        });
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            axum::serve(listener, app).await.expect("serve");
        });
        Self { url, log, _runtime: runtime }
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().unwrap().clone()
    }
}
