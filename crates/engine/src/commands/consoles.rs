//! Remote consoles: a running VM's VNC display opened for a while with a one-time password (a
//! ticket), as oVirt's `graphicsconsoles/{id}/ticket` and `remoteviewerconnectionfile` do. The
//! node's QEMU listens on the host's address with a password required and none set, so nobody
//! gets in until a ticket is given, and the ticket expires on its own.

use rand::distributions::{Alphanumeric, DistString};
use serde_json::json;

use crate::model::{VmId, VmStatus};

use super::{CommandError, Commands};

/// oVirt's default ticket lifetime.
pub const DEFAULT_TICKET_SECS: u64 = 120;

/// A ticket given to a VM's console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleTicket {
    /// Where the console listens (the VM's host).
    pub address: String,
    pub port: u16,
    pub password: String,
    /// Seconds it works for.
    pub expiry: u64,
}

impl ConsoleTicket {
    /// A `remote-viewer` connection file (virt-viewer's `.vv`), as oVirt hands it out.
    pub fn connection_file(&self, title: &str) -> String {
        format!(
            "[virt-viewer]\ntype=vnc\nhost={}\nport={}\npassword={}\n\
             # Password is valid for {} seconds.\ndelete-this-file=1\nfullscreen=0\n\
             title={title}:%d\ntoggle-fullscreen=shift+f11\nrelease-cursor=shift+f12\n\
             secure-attention=ctrl+alt+end\n",
            self.address, self.port, self.password, self.expiry
        )
    }
}

impl Commands {
    /// Opens `vm`'s console for `expiry` seconds with `password` (a fresh random one when
    /// `None`). The VM must be running.
    pub async fn console_ticket(
        &self,
        vm: VmId,
        password: Option<String>,
        expiry: Option<u64>,
    ) -> Result<ConsoleTicket, CommandError> {
        let expiry = expiry.unwrap_or(DEFAULT_TICKET_SECS);
        if !(1..=86_400).contains(&expiry) {
            return Err(CommandError::invalid(format!(
                "a console ticket lasts 1 to 86400 seconds, not {expiry}"
            )));
        }
        let password = match password {
            Some(p) if p.is_empty() || p.len() > 256 => {
                return Err(CommandError::invalid("a console ticket is 1 to 256 characters"))
            }
            Some(p) => p,
            None => Alphanumeric.sample_string(&mut rand::thread_rng(), 12),
        };
        let v = self
            .app
            .db
            .vm_get(vm)
            .await?
            .ok_or_else(|| CommandError::not_found("VM", vm))?;
        let host = match (v.runtime.status, v.runtime.run_on_host) {
            (VmStatus::Up | VmStatus::Paused | VmStatus::PoweringUp | VmStatus::PoweringDown, Some(h)) => h,
            (s, _) => {
                return Err(CommandError::Conflict(format!(
                    "VM {} is {s}: its console opens while it runs",
                    v.name
                )))
            }
        };
        let node = self.app.host_client(host).await?;
        let at = node
            .call(
                "VM.setTicket",
                json!({ "vmID": vm, "password": password, "ttl": expiry, "existingConnAction": "keep" }),
            )
            .await?;
        let (Some(address), Some(port)) = (at["address"].as_str(), at["port"].as_u64()) else {
            return Err(CommandError::Conflict(format!(
                "the host of VM {} answered no console address: {at}",
                v.name
            )));
        };
        tracing::info!(vm_id = %vm, host = %host, expiry, "console ticket given");
        Ok(ConsoleTicket {
            address: address.to_string(),
            port: u16::try_from(port).map_err(|_| CommandError::Conflict(format!("console port {port}")))?,
            password,
            expiry,
        })
    }
}
