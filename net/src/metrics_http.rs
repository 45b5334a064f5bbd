//! Prometheus metrics over HTTP: any registry rendered in the text exposition format and
//! served on `/metrics` (axum). The scheduler and the autoscaler both serve theirs this way.

use prometheus::{Encoder, Registry, TextEncoder};

/// A registry in the text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Serves a registry on `/metrics` at `listener` until the task is dropped (the scheduler's
/// and the autoscaler's metrics both go out this way).
pub async fn serve(registry: Registry, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    render(&registry),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
