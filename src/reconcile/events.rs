//! Kubernetes Events about resources, written through `events.k8s.io/v1`. The same
//! event on the same object again within six minutes updates the first one's series
//! (count and last time seen) rather than adding an object. Only a digest of each
//! recent event, its object name and its count are kept: kube's own recorder keeps
//! whole Event objects, about 1.5 KB each, thousands of them during a large cold start.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

/// How long a repeat still counts toward an earlier event's series (kube's and
/// client-go's window).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// Expired entries are dropped at most this often, not on every event.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

/// One event to publish.
pub struct Event<'a> {
    pub type_: EventType,
    pub reason: &'a str,
    pub note: &'a str,
    pub action: &'a str,
}

struct Sent {
    name: Box<str>,
    count: i32,
    last: Instant,
}

struct Recent {
    sent: HashMap<u64, Sent>,
    swept: Instant,
}

pub struct Recorder {
    client: kube::Client,
    controller: String,
    recent: Mutex<Recent>,
}

impl Recorder {
    pub fn new(client: kube::Client, controller: &str) -> Self {
        Recorder {
            client,
            controller: controller.into(),
            recent: Mutex::new(Recent {
                sent: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    pub async fn publish(&self, ev: &Event<'_>, about: &ObjectReference) -> kube::Result<()> {
        let ns = about.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), ns);
        let key = key(ev, about);
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let repeat = {
            let mut recent = self.recent.lock().expect("lock");
            if recent.swept.elapsed() >= SWEEP_EVERY {
                recent.sent.retain(|_, s| s.last.elapsed() < SERIES_WINDOW);
                recent.swept = Instant::now();
            }
            recent
                .sent
                .get(&key)
                .filter(|s| s.last.elapsed() < SERIES_WINDOW)
                .map(|s| (s.name.clone(), s.count + 1))
        };
        if let Some((name, count)) = repeat {
            let patch = json!({"series": {"count": count, "lastObservedTime": now}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.remember(key, name, count);
                    return Ok(());
                }
                // Deleted meanwhile (events expire): start a new one.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let object = about.name.as_deref().unwrap_or(&self.controller);
        let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let name = event_name(object, nanos);
        let event: K8sEvent = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "eventTime": now,
            "type": match ev.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            },
            "reason": ev.reason,
            "note": within_bytes(ev.note, NOTE_BYTES),
            "action": ev.action,
            "regarding": about,
            "reportingController": self.controller,
            "reportingInstance": self.controller,
        }))
        .map_err(kube::Error::SerdeError)?;
        api.create(&PostParams::default(), &event).await?;
        self.remember(key, name.into(), 1);
        Ok(())
    }

    fn remember(&self, key: u64, name: Box<str>, count: i32) {
        let last = Instant::now();
        self.recent
            .lock()
            .expect("lock")
            .sent
            .insert(key, Sent { name, count, last });
    }
}

/// The Event API's limits: a note of at most 1024 bytes, a name of at most 253.
const NOTE_BYTES: usize = 1024;
const NAME_BYTES: usize = 253;

/// `text` cut to at most `max` bytes on a character boundary, ending in `…` if cut.
fn within_bytes(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end]).into()
}

/// `<object>.<nanoseconds in hex>`, as client-go names events, with the object's part
/// shortened where the whole would pass 253 bytes (an object name may have 253 alone).
/// Object names are ASCII; a cut part still ends in a letter or digit.
fn event_name(object: &str, nanos: i64) -> String {
    let suffix = format!(".{nanos:x}");
    let keep = object.len().min(NAME_BYTES - suffix.len());
    let part = object
        .get(..keep)
        .unwrap_or("event")
        .trim_end_matches(['.', '-']);
    format!("{part}{suffix}")
}

/// Which earlier event a new one repeats: same object (by uid, not by version), type,
/// reason, action and note. A changed note is a new event, so what it says is never
/// hidden behind an older message's count.
fn key(ev: &Event<'_>, about: &ObjectReference) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &about.namespace,
        &about.name,
        &about.uid,
        ev.type_,
        ev.reason,
        ev.action,
        ev.note,
    )
        .hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn about(rv: &str) -> ObjectReference {
        ObjectReference {
            namespace: Some("team".into()),
            name: Some("etl".into()),
            uid: Some("u1".into()),
            resource_version: Some(rv.into()),
            ..Default::default()
        }
    }

    #[test]
    fn notes_and_names_fit_the_event_api() {
        assert_eq!(within_bytes("short", 1024), "short");
        let long = "数".repeat(400);
        let cut = within_bytes(&long, 1024);
        assert!(cut.len() <= 1024 && cut.ends_with('…'), "{cut}");
        assert_eq!(cut.chars().count(), 340 + 1);
        let name = event_name(&format!("{}-{}", "a".repeat(235), "b".repeat(17)), 1 << 60);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.starts_with(&"a".repeat(235)) && name.ends_with(".1000000000000000"));
        assert!(!name.contains("-."), "{name}");
        assert_eq!(event_name("etl", 255), "etl.ff");
    }

    #[test]
    fn a_repeat_is_the_same_event_whatever_the_object_version() {
        let ev = |note| Event {
            type_: EventType::Warning,
            reason: "PrefectUnreachable",
            note,
            action: "Sync",
        };
        assert_eq!(key(&ev("down"), &about("1")), key(&ev("down"), &about("2")));
        assert_ne!(key(&ev("down"), &about("1")), key(&ev("gone"), &about("1")));
        let mut other = about("1");
        other.uid = Some("u2".into());
        assert_ne!(key(&ev("down"), &about("1")), key(&ev("down"), &other));
    }
}
