//! Errors as RFC 9457 problem details (`application/problem+json`).
//!
//! `type` is a URN naming the kind of problem (stable, for clients to branch on), `title` its
//! short name, `detail` what went wrong with this request and how to fix it. A database
//! failure is answered with a fixed text: the error itself goes to the log, never to the
//! client (it could name the server or a value).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::StoreError;

/// The media type of a problem document.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URN naming the kind of problem, e.g. `urn:ccmail:problem:stale-claim`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The kind's short name.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong with this request, and how to fix it.
    pub detail: String,
    /// For a refused step: the work item's status now.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub current_status: Option<String>,
}

impl Problem {
    pub fn new(status: StatusCode, kind: &str, title: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: format!("urn:ccmail:problem:{kind}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            current_status: None,
        }
    }

    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Not authenticated",
            detail,
        )
    }

    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, "forbidden", "Not allowed", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Malformed request",
            detail,
        )
    }

    pub fn invalid(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "Invalid request",
            detail,
        )
    }

    /// A step refused because the claim or the state is no longer what the caller expects.
    pub fn stale(detail: impl Into<String>, current_status: &str) -> Problem {
        let mut p = Problem::new(
            StatusCode::CONFLICT,
            "stale-claim",
            "Claim or state no longer current",
            detail,
        );
        p.current_status = Some(current_status.to_owned());
        p
    }

    /// A database failure: logged here, answered without its text.
    pub fn from_store(error: StoreError) -> Problem {
        if error.is_transient() {
            tracing::warn!(error = %error, "API request failed: the database did not answer");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Database unavailable",
                "the database did not answer; retry the request (with the same Idempotency-Key)",
            )
        } else {
            tracing::error!(error = %error, "API request failed");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the request failed inside ccmail; the worker's log has the cause",
            )
        }
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let unauthorized = status == StatusCode::UNAUTHORIZED;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if unauthorized {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ccmail\""),
            );
        }
        response
    }
}
