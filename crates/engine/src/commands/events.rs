//! External events: what other applications (backup tools, monitoring) record in the engine's
//! event log through the API, as oVirt's `POST /events` does. Each names its `origin` and its
//! own `custom_id`, unique together (the database's index refuses a second one), so a sender
//! that retries after a lost answer records nothing twice.

use crate::model::{Event, NewEvent, Severity};

use super::{CommandError, Commands};

/// oVirt's AuditLogType codes of external events, by severity.
pub const EXTERNAL_EVENT_NORMAL: i32 = 12000;
pub const EXTERNAL_EVENT_WARNING: i32 = 12001;
pub const EXTERNAL_EVENT_ERROR: i32 = 12002;

/// The longest description an external event may carry.
pub const MAX_DESCRIPTION: usize = 4000;

impl Commands {
    /// Records `ev`, an external event: `origin` and `custom_id` must be set, the origin not
    /// the engine's own ("oVirt"); its code follows the severity.
    pub async fn add_external_event(&self, mut ev: NewEvent) -> Result<Event, CommandError> {
        let origin = ev.origin.clone().unwrap_or_default();
        if origin.trim().is_empty() || ev.custom_id.is_none() {
            return Err(CommandError::invalid(
                "an external event needs its <origin> (who sends it) and a <custom_id> of its own",
            ));
        }
        if origin.eq_ignore_ascii_case("ovirt") || origin.len() > 255 {
            return Err(CommandError::invalid(format!(
                "origin {origin:?} is the engine's own or longer than 255 characters"
            )));
        }
        if ev.description.trim().is_empty() || ev.description.len() > MAX_DESCRIPTION {
            return Err(CommandError::invalid(format!(
                "an event's description is 1 to {MAX_DESCRIPTION} characters"
            )));
        }
        let severity = ev.severity.unwrap_or(Severity::Normal);
        ev.code = match severity {
            Severity::Normal => EXTERNAL_EVENT_NORMAL,
            Severity::Warning => EXTERNAL_EVENT_WARNING,
            _ => EXTERNAL_EVENT_ERROR,
        };
        ev.severity = Some(severity);
        Ok(self.app.db.event_add(&ev).await?)
    }
}
