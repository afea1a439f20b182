//! The one place where use-case errors become gRPC statuses.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::{error, warn};

use crate::app::AppError;
use crate::domain::{ValidationError, ValidationKind};

impl From<AppError> for Status {
    fn from(err: AppError) -> Self {
        match err {
            AppError::Invalid(ValidationError {
                field,
                reason,
                kind,
            }) => {
                let code = match kind {
                    ValidationKind::Invalid => Code::InvalidArgument,
                    ValidationKind::TooLarge => Code::ResourceExhausted,
                };
                let details =
                    ErrorDetails::with_bad_request_violation(field.clone(), reason.clone());
                Status::with_error_details(code, format!("{field}: {reason}"), details)
            }
            AppError::NotFound { .. } => Status::not_found(err.to_string()),
            AppError::AlreadyExists { .. } | AppError::Exists { .. } => {
                Status::already_exists(err.to_string())
            }
            AppError::FailedPrecondition { .. } => Status::failed_precondition(err.to_string()),
            AppError::OutOfRange(reason) => Status::out_of_range(reason),
            AppError::Unavailable { backend, ref cause } => {
                warn!(backend, cause, "backend unavailable");
                Status::unavailable(unavailable(backend))
            }
            AppError::Internal(ref cause) => {
                error!(cause, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// Returns the code and field a batch item's error is reported with.
pub(crate) fn item_error(err: AppError) -> kairos_proto::v1::ItemError {
    // An outage fails a batch's items alike; the handler logs it once
    // ([`log_unavailable_items`]), not once per item.
    if let AppError::Unavailable { backend, .. } = err {
        return kairos_proto::v1::ItemError {
            code: Code::Unavailable as i32,
            message: unavailable(backend),
            field: String::new(),
        };
    }
    let field = match &err {
        AppError::Invalid(v) => v.field.clone(),
        _ => String::new(),
    };
    let status = Status::from(err);
    kairos_proto::v1::ItemError {
        code: status.code() as i32,
        message: status.message().to_owned(),
        field,
    }
}

/// Logs once how many of a batch's items a backend outage refused.
pub(crate) fn log_unavailable_items<T>(results: &[Result<T, AppError>]) {
    let mut refused = results.iter().filter_map(|r| match r {
        Err(AppError::Unavailable { backend, cause }) => Some((*backend, cause)),
        _ => None,
    });
    if let Some((backend, cause)) = refused.next() {
        let items = 1 + refused.count();
        warn!(
            backend,
            cause, items, "backend unavailable; batch items refused"
        );
    }
}

fn unavailable(backend: &str) -> String {
    format!("{backend} unavailable, retry later")
}
