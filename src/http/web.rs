//! The demo messenger and the browser SDK, embedded in the binary so `cargo run` serves them.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;

const INDEX: &str = include_str!("../../web/demo/index.html");
const APP: &str = include_str!("../../web/demo/app.js");
const STYLE: &str = include_str!("../../web/demo/style.css");
const SDK: &str = include_str!("../../web/sdk/switchboard.js");

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")],
        body,
    )
}

pub async fn index() -> impl IntoResponse {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn app() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", APP)
}

pub async fn style() -> impl IntoResponse {
    asset("text/css; charset=utf-8", STYLE)
}

pub async fn sdk() -> impl IntoResponse {
    asset("text/javascript; charset=utf-8", SDK)
}
