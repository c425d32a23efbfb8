//! Multipart uploads that a start without an answer may leave open.
//!
//! A CreateMultipartUpload whose every attempt got no answer (a frozen
//! server, a cut connection) fails for its caller, but the server may have
//! read it and apply it later, when it runs again. An upload then exists
//! whose ID nobody knows, so nobody completes or aborts it. (A start that a
//! retry answered is handled at once: see `S3Store::abort_strays`.)
//!
//! Such a start is recorded here with the time it was sent, and one task per
//! store looks for what it left once the server answers. It aborts the
//! uploads of that key that the server started from then on, except those
//! this store started itself and has not finished; while this store is
//! starting another upload of that key (whose ID it does not know yet), the
//! key waits for the next look. A start is looked for
//! twice, the second time at least [`FIRST_LOOK`] after the first, since a
//! request the server read before it froze may be applied just after it
//! answers again; after [`GIVE_UP`] without an answer it is dropped with a
//! warning naming the key.
//!
//! A stray holds no part (none is sent for an upload whose ID is unknown),
//! so what is at stake is an upload listed forever, not storage. Another
//! client's upload of the same key, started between the unanswered start
//! and the look, would be aborted too; that is far less likely than a lost
//! answer.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::OpenUpload;

/// How long after an unanswered start the first look comes, and the least
/// time between two looks (later ones back off to [`MAX_WAIT`]).
pub const FIRST_LOOK: Duration = Duration::from_secs(5);
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// How long a start is looked for while the server does not answer.
pub const GIVE_UP: Duration = Duration::from_secs(3600);
/// Looks that must find the server answering before a start is done with.
const LOOKS: u32 = 2;
/// Start times may be whole seconds (SeaweedFS).
const ROUNDING: Duration = Duration::from_secs(1);

/// See the module documentation. Owned by one store; its lock is never
/// held across a request.
#[derive(Default)]
pub struct StrayStarts {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pending: Vec<Pending>,
    /// Uploads this store started and has not completed or aborted.
    ours: HashSet<String>,
    /// Starts of this store under way, per key: their IDs are not known yet.
    starting: HashMap<String, usize>,
    /// A task is looking for the pending starts' strays.
    looking: bool,
}

struct Pending {
    key: String,
    sent: SystemTime,
    looks: u32,
}

/// A start of a key under way (see [`StrayStarts::starting`]).
pub struct Starting<'a> {
    strays: &'a StrayStarts,
    key: String,
    ended: bool,
}

impl Starting<'_> {
    /// It made upload `upload_id`: never taken for a stray.
    pub fn made(mut self, upload_id: &str) {
        self.ended = true;
        self.strays.started(&self.key, upload_id);
    }

    /// It got no answer in any attempt, and was sent at `sent`: what it may
    /// have made is looked for. True when the caller must start the task
    /// that looks (none is running).
    pub fn unanswered(mut self, sent: SystemTime) -> bool {
        self.ended = true;
        self.strays.unanswered(&self.key, sent)
    }
}

/// Dropped without an outcome: answered with a refusal (or its request was
/// dropped), it made nothing.
impl Drop for Starting<'_> {
    fn drop(&mut self) {
        if !self.ended {
            StrayStarts::start_ended(&mut self.strays.state(), &self.key);
        }
    }
}

/// One pending start to look for: the key, and when the start was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub key: String,
    pub sent: SystemTime,
}

impl StrayStarts {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a start of `key`, sent at `sent`, that got no answer. True
    /// when the caller must start the task that looks (none is running).
    fn unanswered(&self, key: &str, sent: SystemTime) -> bool {
        let mut s = self.state();
        Self::start_ended(&mut s, key);
        s.pending.push(Pending { key: key.to_string(), sent, looks: 0 });
        !std::mem::replace(&mut s.looking, true)
    }

    /// A start of `key` by this store is being sent: until the value
    /// returned says how it ended ([`Starting::made`] or
    /// [`Starting::unanswered`]; dropped, it made nothing), no upload of
    /// that key is taken for a stray.
    pub fn starting(&self, key: &str) -> Starting<'_> {
        *self.state().starting.entry(key.to_string()).or_default() += 1;
        Starting { strays: self, key: key.to_string(), ended: false }
    }

    fn start_ended(s: &mut State, key: &str) {
        if let Some(n) = s.starting.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                s.starting.remove(key);
            }
        }
    }

    /// A start of `key` made upload `upload_id`: never taken for a stray.
    fn started(&self, key: &str, upload_id: &str) {
        let mut s = self.state();
        Self::start_ended(&mut s, key);
        s.ours.insert(upload_id.to_string());
    }

    /// An upload this store completed or aborted.
    pub fn finished(&self, upload_id: &str) {
        self.state().ours.remove(upload_id);
    }

    /// The starts to look for now, and apart those pending longer than
    /// [`GIVE_UP`], dropped, to be warned about. No start to look for: the
    /// task ends, and the next unanswered start starts another.
    pub fn due(&self, now: SystemTime) -> (Vec<Due>, Vec<String>) {
        let mut s = self.state();
        let mut expired = Vec::new();
        s.pending.retain(|p| {
            let keep = now.duration_since(p.sent).unwrap_or_default() < GIVE_UP;
            if !keep {
                expired.push(p.key.clone());
            }
            keep
        });
        if s.pending.is_empty() {
            s.looking = false;
        }
        (s.pending.iter().map(|p| Due { key: p.key.clone(), sent: p.sent }).collect(), expired)
    }

    /// Of `uploads` (the server's open uploads under the key), those to
    /// abort for `due`: that key, started from its sending on, not ours.
    /// A server that gives no start times gives nothing to tell them by.
    /// `None` while this store is starting an upload of that key: look
    /// again later.
    pub fn strays(&self, due: &Due, uploads: &[OpenUpload]) -> Option<Vec<String>> {
        let s = self.state();
        if s.starting.contains_key(&due.key) {
            return None;
        }
        let strays = uploads
            .iter()
            .filter(|u| {
                u.key == due.key
                    && !s.ours.contains(&u.upload_id)
                    && u.initiated > SystemTime::UNIX_EPOCH
                    && u.initiated + ROUNDING >= due.sent
            })
            .map(|u| u.upload_id.clone())
            .collect();
        Some(strays)
    }

    /// `due` was looked for with the server answering; after [`LOOKS`] such
    /// looks it is done with.
    pub fn looked(&self, due: &Due) {
        let mut s = self.state();
        if let Some(p) = s.pending.iter_mut().find(|p| p.key == due.key && p.sent == due.sent) {
            p.looks += 1;
        }
        s.pending.retain(|p| p.looks < LOOKS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(key: &str, id: &str, initiated: SystemTime) -> OpenUpload {
        OpenUpload { key: key.into(), upload_id: id.into(), initiated }
    }

    #[test]
    fn strays_are_the_keys_uploads_started_since_that_are_not_ours() {
        let s = StrayStarts::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let secs = Duration::from_secs;
        assert!(s.starting("k").unanswered(t0), "the first unanswered start starts the task");
        assert!(!s.starting("other").unanswered(t0), "one task at a time");
        s.starting("k").made("mine");
        let (due, expired) = s.due(t0 + secs(5));
        assert!(expired.is_empty());
        assert_eq!(due[0], Due { key: "k".into(), sent: t0 });
        let uploads = [
            upload("k", "before", t0 - secs(5)),
            upload("k", "same second", t0 - Duration::from_millis(900)),
            upload("k", "stray", t0 + secs(3)),
            upload("k", "mine", t0 + secs(4)),
            upload("k/longer", "other key", t0 + secs(3)),
            upload("k", "no time", SystemTime::UNIX_EPOCH),
        ];
        assert_eq!(s.strays(&due[0], &uploads).unwrap(), ["same second", "stray"]);
        s.finished("mine");
        assert_eq!(s.strays(&due[0], &uploads).unwrap(), ["same second", "stray", "mine"], "finished: no longer ours");
        let under_way = s.starting("k");
        assert_eq!(s.strays(&due[0], &uploads), None, "a start of the key under way: its upload may be listed");
        drop(under_way);
        assert!(s.strays(&due[0], &uploads).is_some(), "refused, or its request dropped: it made nothing");
    }

    #[test]
    fn a_start_is_looked_for_twice_then_done_and_the_task_ends() {
        let s = StrayStarts::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        s.starting("k").unanswered(t0);
        let (due, _) = s.due(t0);
        s.looked(&due[0]);
        let (again, _) = s.due(t0);
        assert_eq!(again, due, "looked for once: still pending");
        s.looked(&due[0]);
        assert!(s.due(t0).0.is_empty(), "done, and the task ends");
        assert!(s.starting("k").unanswered(t0), "a later start starts a new task");
    }

    #[test]
    fn a_start_the_server_never_answers_about_is_given_up() {
        let s = StrayStarts::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        s.starting("old").unanswered(t0);
        s.starting("new").unanswered(t0 + GIVE_UP);
        let (due, expired) = s.due(t0 + GIVE_UP);
        assert_eq!((due.len(), due[0].key.as_str(), expired), (1, "new", vec!["old".to_string()]));
        let (due, expired) = s.due(t0 + GIVE_UP * 2);
        assert_eq!((due.len(), expired), (0, vec!["new".to_string()]));
        assert!(s.starting("k").unanswered(t0), "the task ended with the last start: the next starts another");
    }
}
