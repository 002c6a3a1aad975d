//! Which protocol version to speak to each receiver.
//!
//! A sender of this build speaks [`PROTOCOL_VERSION`] first. A receiver of
//! an older build refuses that `Hello` (code
//! [`ErrorCode::Version`](crate::wire::ErrorCode::Version)); the sender then
//! speaks the next older version this build also speaks (down to
//! [`MIN_PROTOCOL_VERSION`]) to that receiver, at once, and says so in the
//! log and the VM's status. What it lacks is only what the newer protocol
//! added (version 8: a disk's next log sent behind the one in flight), never
//! safety. The choice is forgotten after [`RETRY_NEWEST`], so a receiver
//! upgraded meanwhile is spoken to in the newest version again (one refused
//! handshake per period while it is not).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::wire::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// How long a receiver's refusal of a newer version is remembered.
pub(crate) const RETRY_NEWEST: Duration = Duration::from_secs(600);

/// The version to speak per receiver address (the VM's `--to`).
#[derive(Debug, Default)]
pub(crate) struct PeerVersions {
    older: Mutex<HashMap<String, (u16, Instant)>>,
}

impl PeerVersions {
    /// The version to say in the next `Hello` to `to`.
    pub(crate) fn speak(&self, to: &str, now: Instant) -> u16 {
        let mut m = self.older.lock();
        match m.get(to) {
            Some((v, since)) if now.duration_since(*since) < RETRY_NEWEST => *v,
            Some(_) => {
                m.remove(to);
                PROTOCOL_VERSION
            }
            None => PROTOCOL_VERSION,
        }
    }

    /// `to` refused a `Hello` of version `refused`: the version to speak
    /// to it now, `None` if there is no older one this build speaks (the
    /// refusal stands). Sessions refused in the same version at once (the
    /// VMs of one receiver) all get the same answer.
    pub(crate) fn refused(&self, to: &str, refused: u16, now: Instant) -> Option<u16> {
        let mut m = self.older.lock();
        if let Some((v, since)) = m.get(to) {
            if *v < refused && now.duration_since(*since) < RETRY_NEWEST {
                // Another session already stepped down past this one.
                return Some(*v);
            }
        }
        if refused <= MIN_PROTOCOL_VERSION || refused > PROTOCOL_VERSION {
            return None;
        }
        let v = refused - 1;
        m.insert(to.to_string(), (v, now));
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_steps_down_once_per_receiver_and_is_forgotten_later() {
        let p = PeerVersions::default();
        let t0 = Instant::now();
        assert_eq!(p.speak("a:1", t0), PROTOCOL_VERSION);
        assert_eq!(
            p.refused("a:1", PROTOCOL_VERSION, t0),
            Some(PROTOCOL_VERSION - 1)
        );
        // Another VM's session, refused in the newest version too, does
        // not step down twice.
        assert_eq!(
            p.refused("a:1", PROTOCOL_VERSION, t0),
            Some(PROTOCOL_VERSION - 1)
        );
        assert_eq!(p.speak("a:1", t0), PROTOCOL_VERSION - 1);
        // Other receivers are spoken to in the newest version.
        assert_eq!(p.speak("b:1", t0), PROTOCOL_VERSION);
        // After the period the newest is tried again.
        let later = t0 + RETRY_NEWEST;
        assert_eq!(p.speak("a:1", later), PROTOCOL_VERSION);
        assert_eq!(p.speak("a:1", later), PROTOCOL_VERSION);
    }

    #[test]
    fn the_oldest_version_refused_is_final() {
        let p = PeerVersions::default();
        let t0 = Instant::now();
        assert_eq!(p.refused("a:1", MIN_PROTOCOL_VERSION, t0), None);
        assert_eq!(p.speak("a:1", t0), PROTOCOL_VERSION);
        assert_eq!(p.refused("a:1", PROTOCOL_VERSION + 1, t0), None);
    }
}
