//! Bulk reads for drift checks. Per Prefect server (and credentials), the deployments
//! the operator manages are read in pages of 200 ids (`POST /deployments/filter`;
//! Prefect's filter has no label filter, so the ids recorded in status are the key),
//! and every drift check plans against that snapshot. A resource whose deployment the
//! snapshot shows as it should be costs no request at all; where the snapshot shows a
//! difference, or lacks the deployment, the pass reads it directly before writing.
//!
//! A snapshot is read at most once per resync interval. Each new read is compared with
//! the one before: a deployment whose `updated` time moved, or that is gone, has changed
//! in Prefect, and its resource is asked for a pass at once (reading Prefect directly).
//! So a change is found within about one interval for `ceil(N/200)` requests per server
//! per interval, with or without an event stream.
//!
//! Deployments registered after a read (a cold start spans several intervals) are not
//! in it. A check that misses one reads it into the snapshot together with the oldest
//! others waiting, up to a page, instead of each check reading its own directly.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::compact::{Compact, Dictionary};
use crate::observed::ObservedDeployment;
use crate::prefect::PrefectClient;
use crate::prefect_events::Trigger;
use crate::Result;

const PAGE: usize = 200;

/// The snapshots of every server, by client identity.
#[derive(Default)]
pub struct Snapshots {
    servers: Mutex<HashMap<String, Arc<Server>>>,
}

#[derive(Default)]
struct Server {
    ids: Mutex<Registry>,
    /// The last read; the async lock makes concurrent passes wait for one read instead
    /// of each making their own.
    data: tokio::sync::Mutex<Data>,
}

#[derive(Default)]
struct Registry {
    /// The deployment ids resources recorded for this server, and their resources.
    ids: HashMap<String, Trigger>,
    /// Ids registered since the last full read began, oldest first: not in the
    /// snapshot yet. Drift checks come due in about the order resources registered.
    unread: Vec<String>,
}

impl Registry {
    /// `id` and the oldest others not yet read, up to a page, no longer counted as
    /// unread; nothing when `id` is not waiting to be read.
    fn take_unread(&mut self, id: &str) -> Vec<String> {
        let Some(at) = self.unread.iter().position(|u| u == id) else {
            return Vec::new();
        };
        let mine = self.unread.remove(at);
        let more = self.unread.len().min(PAGE - 1);
        std::iter::once(mine)
            .chain(self.unread.drain(..more))
            .collect()
    }
}

#[derive(Default)]
struct Data {
    read_at: Option<Instant>,
    entries: HashMap<String, Entry>,
}

/// One deployment as last read, kept as compressed JSON text (`compact`): at 10,000
/// deployments the decoded form would be several times larger, and only the resource
/// that asks for it decodes it, at most once per interval.
struct Entry {
    updated: Option<Box<str>>,
    text: Compact,
}

/// The dictionary of every snapshot entry.
static DEPLOYMENTS: Dictionary = Dictionary::new();

impl Entry {
    fn decode(&self) -> Option<ObservedDeployment> {
        let text = self.text.text(&DEPLOYMENTS).ok()?;
        serde_json::from_str(&text).ok()
    }
}

impl Entry {
    fn of(d: &ObservedDeployment) -> Entry {
        Entry {
            updated: d
                .fields
                .get("updated")
                .and_then(|v| v.as_str())
                .map(Box::from),
            text: Compact::new(
                &serde_json::to_string(d).expect("a decoded deployment encodes"),
                &DEPLOYMENTS,
            ),
        }
    }
}

impl Snapshots {
    fn server(&self, client: &PrefectClient) -> Arc<Server> {
        let mut map = self.servers.lock().expect("snapshots lock");
        map.entry(client.identity()).or_default().clone()
    }

    /// Remembers that resource `who` manages deployment `id` on this client's server.
    pub fn register(&self, client: &PrefectClient, id: &str, who: Trigger) {
        let server = self.server(client);
        let mut reg = server.ids.lock().expect("snapshot ids lock");
        if reg.ids.insert(id.to_string(), who).is_none() {
            reg.unread.push(id.to_string());
        }
    }

    /// Forgets a deployment (its resource is gone or points elsewhere now).
    pub fn forget(&self, client: &PrefectClient, id: &str) {
        let server = self.server(client);
        let mut reg = server.ids.lock().expect("snapshot ids lock");
        reg.ids.remove(id);
        reg.unread.retain(|u| u != id);
    }

    /// Forgets whatever resource `who` had registered on any server (it is deleted).
    pub fn forget_resource(&self, who: &Trigger) {
        let servers: Vec<Arc<Server>> = {
            let map = self.servers.lock().expect("snapshots lock");
            map.values().cloned().collect()
        };
        for server in servers {
            let mut reg = server.ids.lock().expect("snapshot ids lock");
            let Registry { ids, unread } = &mut *reg;
            ids.retain(|_, w| w != who);
            unread.retain(|u| ids.contains_key(u));
        }
    }

    /// Deployment `id` as the server's snapshot holds it, reading the snapshot anew when
    /// it is older than `max_age`. `Ok(None)`: the server does not have it (or it was
    /// never registered): the caller reads it directly. A new read hands the resources
    /// of the deployments that changed since the last one (other than `id`) to `changed`.
    pub async fn lookup(
        &self,
        client: &PrefectClient,
        id: &str,
        max_age: Duration,
        changed: impl FnOnce(Vec<Trigger>),
    ) -> Result<Option<ObservedDeployment>> {
        let server = self.server(client);
        let mut data = server.data.lock().await;
        let fresh = data.read_at.is_some_and(|at| at.elapsed() < max_age);
        if !fresh {
            let ids: Vec<(String, Trigger)> = {
                let mut reg = server.ids.lock().expect("snapshot ids lock");
                reg.unread.clear();
                reg.ids
                    .iter()
                    .map(|(i, w)| (i.clone(), w.clone()))
                    .collect()
            };
            // Merged page by page into the entries in place, so memory holds one copy
            // plus a page. Changes found before a failed page are still handed on.
            let mut merge = Merge::new(id);
            let mut read = Ok(());
            for chunk in ids.chunks(PAGE) {
                let page: Vec<String> = chunk.iter().map(|(i, _)| i.clone()).collect();
                match client.read_deployments(&page).await {
                    Ok(found) => merge.page(&mut data.entries, &found, chunk),
                    Err(e) => {
                        read = Err(e);
                        break;
                    }
                }
            }
            if read.is_ok() {
                merge.finish(&mut data.entries, &ids);
                data.read_at = Some(Instant::now());
            }
            changed(merge.changed);
            read?;
        } else if !data.entries.contains_key(id) {
            // Registered since the read: read it with the oldest others waiting, one
            // page (theirs are the checks due next).
            let page = server
                .ids
                .lock()
                .expect("snapshot ids lock")
                .take_unread(id);
            if !page.is_empty() {
                match client.read_deployments(&page).await {
                    Ok(found) => {
                        for d in &found {
                            if page.contains(&d.id) {
                                data.entries.insert(d.id.clone(), Entry::of(d));
                            }
                        }
                    }
                    Err(e) => {
                        // Left for a later check; this one reads directly.
                        tracing::debug!(error = %e, "reading newly registered deployments failed");
                        let mut reg = server.ids.lock().expect("snapshot ids lock");
                        let Registry { ids, unread } = &mut *reg;
                        let back: Vec<String> =
                            page.into_iter().filter(|i| ids.contains_key(i)).collect();
                        unread.splice(0..0, back);
                    }
                }
            }
        }
        match data.entries.get(id) {
            Some(e) => Ok(e.decode()),
            None => Ok(None),
        }
    }
}

/// One re-read of a snapshot: the deployments whose `updated` time moved, or that are
/// gone, compared with the read before (deployments registered since then are not
/// compared), other than the one `asking`.
struct Merge<'a> {
    asking: &'a str,
    seen: HashSet<String>,
    changed: Vec<Trigger>,
}

impl<'a> Merge<'a> {
    fn new(asking: &'a str) -> Self {
        Merge {
            asking,
            seen: HashSet::new(),
            changed: Vec::new(),
        }
    }

    /// One page's answer for the ids in `asked`.
    fn page(
        &mut self,
        entries: &mut HashMap<String, Entry>,
        found: &[ObservedDeployment],
        asked: &[(String, Trigger)],
    ) {
        for d in found {
            let Some((_, who)) = asked.iter().find(|(i, _)| *i == d.id) else {
                continue;
            };
            let new = Entry::of(d);
            let moved = entries
                .get(&d.id)
                .is_some_and(|old| old.updated != new.updated);
            if moved && d.id != self.asking {
                self.changed.push(who.clone());
            }
            entries.insert(d.id.clone(), new);
            self.seen.insert(d.id.clone());
        }
    }

    /// Drops what the read no longer shows (a change, when it was there before) and
    /// what is no longer registered.
    fn finish(&mut self, entries: &mut HashMap<String, Entry>, ids: &[(String, Trigger)]) {
        for (id, who) in ids {
            if !self.seen.contains(id) && entries.remove(id).is_some() && id != self.asking {
                self.changed.push(who.clone());
            }
        }
        let seen = &self.seen;
        entries.retain(|id, _| seen.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(id: &str, updated: &str) -> ObservedDeployment {
        serde_json::from_value(json!({"id": id, "updated": updated})).unwrap()
    }

    fn read(
        entries: &mut HashMap<String, Entry>,
        found: &[ObservedDeployment],
        ids: &[(String, Trigger)],
        asking: &str,
    ) -> Vec<Trigger> {
        let mut merge = Merge::new(asking);
        // Two pages, as the ids come in pages.
        let (a, b) = ids.split_at(ids.len() / 2);
        merge.page(entries, found, a);
        merge.page(entries, found, b);
        merge.finish(entries, ids);
        let mut changed = merge.changed;
        changed.sort_by_key(|t| t.name.clone());
        changed
    }

    #[test]
    fn late_registrations_are_read_oldest_first() {
        let mut reg = Registry::default();
        let ids: Vec<String> = (0..450).map(|i| format!("d{i}")).collect();
        reg.unread = ids.clone();
        let page = reg.take_unread("d300");
        assert_eq!(page.len(), PAGE);
        assert_eq!(page[0], "d300");
        assert_eq!(page[1..], ids[..PAGE - 1], "then the oldest");
        assert_eq!(reg.unread.len(), 450 - PAGE);
        assert_eq!(reg.unread[0], format!("d{}", PAGE - 1));
        assert!(reg.take_unread("d300").is_empty(), "read already");
        assert!(reg.take_unread("d5").is_empty(), "read already");
        let page = reg.take_unread("d449");
        assert_eq!(page.len(), PAGE);
        assert_eq!(reg.unread.len(), 450 - 2 * PAGE);
        let rest = reg.take_unread(&reg.unread[10].clone());
        assert_eq!(rest.len(), 450 - 2 * PAGE);
        assert!(reg.unread.is_empty());
    }

    #[test]
    fn changes_between_two_reads() {
        let who = |n: &str| Trigger::new(n).within("ns");
        let ids = |names: &[&str]| -> Vec<(String, Trigger)> {
            names.iter().map(|n| (n.to_string(), who(n))).collect()
        };
        let mut entries = HashMap::new();
        let first = [
            deployment("same", "t1"),
            deployment("edited", "t1"),
            deployment("gone", "t1"),
            deployment("asking", "t1"),
        ];
        let registered = ids(&["same", "edited", "gone", "asking"]);
        assert!(read(&mut entries, &first, &registered, "asking").is_empty());
        assert_eq!(entries.len(), 4);

        let second = [
            deployment("same", "t1"),
            deployment("edited", "t2"),
            deployment("asking", "t2"),
            deployment("new", "t1"),
        ];
        let registered = ids(&["same", "edited", "gone", "asking", "new"]);
        let changed = read(&mut entries, &second, &registered, "asking");
        assert_eq!(changed, vec![who("edited"), who("gone")]);
        assert_eq!(entries.len(), 4, "gone is dropped, new is kept");
        let kept: ObservedDeployment = entries["edited"].decode().unwrap();
        assert_eq!(kept, second[1], "kept as read");

        // No longer registered: dropped without counting as a change.
        let changed = read(&mut entries, &second, &ids(&["same"]), "x");
        assert!(changed.is_empty());
        assert_eq!(entries.keys().collect::<Vec<_>>(), vec!["same"]);
    }
}
