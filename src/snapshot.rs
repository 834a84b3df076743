//! Bulk reads for drift checks. Per Prefect server (and credentials), the deployments
//! the operator manages are read in pages of 200 ids (`POST /deployments/filter`;
//! Prefect's filter has no label filter, so the ids recorded in status are the key),
//! and every drift check plans against that snapshot. A resource whose deployment the
//! snapshot shows as it should be costs no request at all; where the snapshot shows a
//! difference, or lacks the deployment, the pass reads it directly before writing.
//! The automations that triggers made are kept the same way (`POST /automations/filter`
//! by id), on servers whose filter takes ids; on others each check reads its own.
//!
//! A snapshot is read at most once per resync interval. Each new read is compared with
//! the one before: an object whose `updated` time moved, or that is gone, has changed
//! in Prefect, and its resource is asked for a pass at once (reading Prefect directly).
//! So a change is found within about one interval for `ceil(N/200)` requests per server
//! per interval, with or without an event stream.
//!
//! Objects registered after a read (a cold start spans several intervals) are not in
//! it. A check that misses one reads it into the snapshot together with the oldest
//! others waiting, up to a page, instead of each check reading its own directly.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::compact::{Compact, Dictionary};
use crate::observed::{ObservedAutomation, ObservedDeployment};
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
    deployments: Book<ObservedDeployment>,
    automations: Book<ObservedAutomation>,
}

/// What a snapshot holds: one kind of Prefect object, read in pages by id.
trait Held: Serialize + DeserializeOwned + Sized {
    /// What the kind is called in logs.
    const KIND: &'static str;
    fn id(&self) -> &str;
    /// Prefect's `updated` time: it moves whenever the server's copy changes.
    fn updated(&self) -> Option<&str>;
    /// The dictionary the kind's entries are compressed against.
    fn dictionary() -> &'static Dictionary;
    /// One page; `None` when the server cannot read this kind by id.
    async fn read(client: &PrefectClient, ids: &[String]) -> Result<Option<Vec<Self>>>;
}

static DEPLOYMENTS: Dictionary = Dictionary::new();
static AUTOMATIONS: Dictionary = Dictionary::new();

impl Held for ObservedDeployment {
    const KIND: &'static str = "deployments";
    fn id(&self) -> &str {
        &self.id
    }
    fn updated(&self) -> Option<&str> {
        self.fields.get("updated").and_then(|v| v.as_str())
    }
    fn dictionary() -> &'static Dictionary {
        &DEPLOYMENTS
    }
    async fn read(client: &PrefectClient, ids: &[String]) -> Result<Option<Vec<Self>>> {
        client.read_deployments(ids).await.map(Some)
    }
}

impl Held for ObservedAutomation {
    const KIND: &'static str = "automations";
    fn id(&self) -> &str {
        &self.id
    }
    fn updated(&self) -> Option<&str> {
        self.fields.get("updated").and_then(|v| v.as_str())
    }
    fn dictionary() -> &'static Dictionary {
        &AUTOMATIONS
    }
    async fn read(client: &PrefectClient, ids: &[String]) -> Result<Option<Vec<Self>>> {
        client.read_automations(ids).await
    }
}

/// The snapshot of one kind of object on one server.
struct Book<T> {
    ids: Mutex<Registry>,
    /// The last read; the async lock makes concurrent passes wait for one read instead
    /// of each making their own.
    data: tokio::sync::Mutex<Data>,
    /// The server answered that it cannot read this kind by id: nothing is kept.
    unreadable: AtomicBool,
    kind: std::marker::PhantomData<fn() -> T>,
}

impl<T> Default for Book<T> {
    fn default() -> Self {
        Book {
            ids: Mutex::default(),
            data: tokio::sync::Mutex::default(),
            unreadable: AtomicBool::new(false),
            kind: std::marker::PhantomData,
        }
    }
}

#[derive(Default)]
struct Registry {
    /// The ids resources recorded for this server, and their resources.
    ids: HashMap<String, Trigger>,
    /// The ids each resource registered through `set`.
    of: HashMap<Trigger, Vec<String>>,
    /// Ids registered since the last full read began, oldest first: not in the
    /// snapshot yet. Drift checks come due in about the order resources registered.
    unread: Vec<String>,
    /// Ids more than one resource has registered, and those resources: two resources
    /// that record one deployment (`plan` lets only one of them write to it). Empty
    /// unless that happens.
    shared: HashMap<String, Vec<Trigger>>,
}

impl Registry {
    fn add(&mut self, id: &str, who: &Trigger) {
        match self.ids.insert(id.to_string(), who.clone()) {
            None => self.unread.push(id.to_string()),
            Some(before) if &before != who => {
                let claims = self.shared.entry(id.to_string()).or_default();
                for w in [before, who.clone()] {
                    if !claims.contains(&w) {
                        claims.push(w);
                    }
                }
            }
            Some(_) => {}
        }
    }

    /// The resources that registered `id`.
    fn claimants(&self, id: &str) -> Vec<Trigger> {
        let mut all: Vec<Trigger> = self.shared.get(id).cloned().unwrap_or_default();
        if let Some(w) = self.ids.get(id) {
            if !all.contains(w) {
                all.push(w.clone());
            }
        }
        all
    }

    /// `who` no longer records `id`; another resource that does keeps it registered.
    fn drop_claim(&mut self, id: &str, who: &Trigger) {
        let others: Vec<Trigger> = match self.shared.remove(id) {
            Some(mut claims) => {
                claims.retain(|w| w != who);
                claims
            }
            None => Vec::new(),
        };
        if self.ids.get(id) == Some(who) {
            match others.first() {
                Some(other) => {
                    self.ids.insert(id.to_string(), other.clone());
                }
                None => {
                    self.ids.remove(id);
                    self.unread.retain(|u| u != id);
                }
            }
        }
        if others.len() > 1 {
            self.shared.insert(id.to_string(), others);
        }
    }

    /// Makes `ids` the ones `who` has registered, forgetting those it no longer has.
    fn set(&mut self, who: &Trigger, ids: &[String]) {
        let old = if ids.is_empty() {
            self.of.remove(who)
        } else {
            self.of.insert(who.clone(), ids.to_vec())
        };
        for o in old.unwrap_or_default() {
            if !ids.contains(&o) {
                self.drop_claim(&o, who);
            }
        }
        for id in ids {
            self.add(id, who);
        }
    }

    fn forget(&mut self, who: &Trigger) {
        let shared: Vec<String> = self
            .shared
            .iter()
            .filter(|(_, claims)| claims.contains(who))
            .map(|(id, _)| id.clone())
            .collect();
        for id in shared {
            self.drop_claim(&id, who);
        }
        let Registry {
            ids, of, unread, ..
        } = self;
        of.remove(who);
        ids.retain(|_, w| w != who);
        unread.retain(|u| ids.contains_key(u));
    }

    /// The `asked` ids still waiting to be read and the oldest others, up to a page, no
    /// longer counted as unread; nothing when none of `asked` is waiting.
    fn take_unread(&mut self, asked: &[String]) -> Vec<String> {
        let mut page: Vec<String> = Vec::new();
        self.unread.retain(|u| {
            let mine = asked.contains(u) && page.len() < PAGE;
            if mine {
                page.push(u.clone());
            }
            !mine
        });
        if page.is_empty() {
            return page;
        }
        let more = self.unread.len().min(PAGE.saturating_sub(page.len()));
        page.extend(self.unread.drain(..more));
        page
    }
}

#[derive(Default)]
struct Data {
    read_at: Option<Instant>,
    entries: HashMap<String, Entry>,
}

/// One object as last read, kept as compressed JSON text (`compact`): at 10,000
/// deployments the decoded form would be several times larger, and only the resource
/// that asks for it decodes it, at most once per interval.
struct Entry {
    updated: Option<Box<str>>,
    text: Compact,
}

impl Entry {
    fn of<T: Held>(d: &T) -> Entry {
        Entry {
            updated: d.updated().map(Box::from),
            text: Compact::new(
                &serde_json::to_string(d).expect("a decoded object encodes"),
                T::dictionary(),
            ),
        }
    }

    fn decode<T: Held>(&self) -> Option<T> {
        let text = self.text.text(T::dictionary()).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Prefect's ids are UUIDs; anything else in a status (written by hand, say) would make
/// the server refuse the whole page it is in, so it is never registered.
fn is_uuid(id: &str) -> bool {
    id.len() == 36
        && id.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl Snapshots {
    fn server(&self, client: &PrefectClient) -> Arc<Server> {
        let mut map = self.servers.lock().expect("snapshots lock");
        map.entry(client.identity()).or_default().clone()
    }

    /// Remembers that resource `who` manages deployment `id` on this client's server.
    pub fn register(&self, client: &PrefectClient, id: &str, who: Trigger) {
        if is_uuid(id) {
            let server = self.server(client);
            let mut reg = server.deployments.ids.lock().expect("snapshot ids lock");
            reg.add(id, &who);
        }
    }

    /// Remembers that the automations resource `who` made on this client's server are
    /// `ids`, and no longer any others.
    pub fn register_automations(&self, client: &PrefectClient, who: &Trigger, ids: &[String]) {
        let ids: Vec<String> = ids.iter().filter(|i| is_uuid(i)).cloned().collect();
        let server = self.server(client);
        let mut reg = server.automations.ids.lock().expect("snapshot ids lock");
        reg.set(who, &ids);
    }

    /// Forgets that resource `who` manages deployment `id` (it points elsewhere now).
    pub fn forget(&self, client: &PrefectClient, id: &str, who: &Trigger) {
        let server = self.server(client);
        let mut reg = server.deployments.ids.lock().expect("snapshot ids lock");
        reg.drop_claim(id, who);
    }

    /// The resources that have registered deployment `id` on this client's server.
    pub fn claimants(&self, client: &PrefectClient, id: &str) -> Vec<Trigger> {
        let server = self.server(client);
        let reg = server.deployments.ids.lock().expect("snapshot ids lock");
        reg.claimants(id)
    }

    /// Forgets whatever resource `who` had registered on any server (it is deleted).
    pub fn forget_resource(&self, who: &Trigger) {
        let servers: Vec<Arc<Server>> = {
            let map = self.servers.lock().expect("snapshots lock");
            map.values().cloned().collect()
        };
        for server in servers {
            server.deployments.ids.lock().expect("ids lock").forget(who);
            server.automations.ids.lock().expect("ids lock").forget(who);
        }
    }

    /// Whether automations on this client's server can be checked from a snapshot: not
    /// once the server has said it cannot filter them by id.
    pub fn automations_in_bulk(&self, client: &PrefectClient) -> bool {
        !self
            .server(client)
            .automations
            .unreadable
            .load(Ordering::Relaxed)
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
        let found = server
            .deployments
            .lookup(client, &[id.to_string()], max_age, changed)
            .await?;
        Ok(found.and_then(|mut f| f.pop()))
    }

    /// The automations `ids` as the server's snapshot holds them, like `lookup`; `None`
    /// unless it holds every one (or when the server cannot read automations by id).
    pub async fn lookup_automations(
        &self,
        client: &PrefectClient,
        ids: &[String],
        max_age: Duration,
        changed: impl FnOnce(Vec<Trigger>),
    ) -> Result<Option<Vec<ObservedAutomation>>> {
        let server = self.server(client);
        server
            .automations
            .lookup(client, ids, max_age, changed)
            .await
    }
}

impl<T: Held> Book<T> {
    async fn lookup(
        &self,
        client: &PrefectClient,
        asked: &[String],
        max_age: Duration,
        changed: impl FnOnce(Vec<Trigger>),
    ) -> Result<Option<Vec<T>>> {
        if asked.is_empty() || self.unreadable.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let mut data = self.data.lock().await;
        let fresh = data.read_at.is_some_and(|at| at.elapsed() < max_age);
        if !fresh {
            let ids: Vec<(String, Trigger)> = {
                let mut reg = self.ids.lock().expect("snapshot ids lock");
                reg.unread.clear();
                reg.ids
                    .iter()
                    .map(|(i, w)| (i.clone(), w.clone()))
                    .collect()
            };
            // Merged page by page into the entries in place, so memory holds one copy
            // plus a page. Changes found before a failed page are still handed on.
            let mut merge = Merge::new(asked);
            let mut read = Ok(());
            for chunk in ids.chunks(PAGE) {
                let page: Vec<String> = chunk.iter().map(|(i, _)| i.clone()).collect();
                match T::read(client, &page).await {
                    Ok(Some(found)) => merge.page(&mut data.entries, &found, chunk),
                    Ok(None) => {
                        self.cannot_read(client, &mut data);
                        return Ok(None);
                    }
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
        } else if asked.iter().any(|id| !data.entries.contains_key(id)) {
            // Registered since the read: read with the oldest others waiting, one page
            // (theirs are the checks due next).
            let page = self
                .ids
                .lock()
                .expect("snapshot ids lock")
                .take_unread(asked);
            if !page.is_empty() {
                match T::read(client, &page).await {
                    Ok(Some(found)) => {
                        for d in &found {
                            if page.iter().any(|p| p == d.id()) {
                                data.entries.insert(d.id().to_string(), Entry::of(d));
                            }
                        }
                    }
                    Ok(None) => {
                        self.cannot_read(client, &mut data);
                        return Ok(None);
                    }
                    Err(e) => {
                        // Left for a later check; this one reads directly.
                        tracing::debug!(error = %e, kind = T::KIND, "reading newly registered ones failed");
                        let mut reg = self.ids.lock().expect("snapshot ids lock");
                        let Registry { ids, unread, .. } = &mut *reg;
                        let back: Vec<String> =
                            page.into_iter().filter(|i| ids.contains_key(i)).collect();
                        unread.splice(0..0, back);
                    }
                }
            }
        }
        let mut found = Vec::with_capacity(asked.len());
        for id in asked {
            match data.entries.get(id).and_then(Entry::decode) {
                Some(d) => found.push(d),
                None => return Ok(None),
            }
        }
        Ok(Some(found))
    }

    fn cannot_read(&self, client: &PrefectClient, data: &mut Data) {
        tracing::info!(
            server = client.base_url(),
            kind = T::KIND,
            "this Prefect server cannot read these by id; each drift check reads its own"
        );
        self.unreadable.store(true, Ordering::Relaxed);
        data.entries.clear();
    }
}

/// One re-read of a snapshot: the objects whose `updated` time moved, or that are gone,
/// compared with the read before (objects registered since then are not compared),
/// other than the ones `asking`.
struct Merge<'a> {
    asking: &'a [String],
    seen: HashSet<String>,
    changed: Vec<Trigger>,
    told: HashSet<Trigger>,
}

impl<'a> Merge<'a> {
    fn new(asking: &'a [String]) -> Self {
        Merge {
            asking,
            seen: HashSet::new(),
            changed: Vec::new(),
            told: HashSet::new(),
        }
    }

    fn tell(&mut self, id: &str, who: &Trigger) {
        // A resource with several automations is told once.
        if !self.asking.iter().any(|a| a == id) && self.told.insert(who.clone()) {
            self.changed.push(who.clone());
        }
    }

    /// One page's answer for the ids in `asked`.
    fn page<T: Held>(
        &mut self,
        entries: &mut HashMap<String, Entry>,
        found: &[T],
        asked: &[(String, Trigger)],
    ) {
        for d in found {
            let Some((_, who)) = asked.iter().find(|(i, _)| i == d.id()) else {
                continue;
            };
            let new = Entry::of(d);
            let moved = entries
                .get(d.id())
                .is_some_and(|old| old.updated != new.updated);
            if moved {
                self.tell(d.id(), who);
            }
            entries.insert(d.id().to_string(), new);
            self.seen.insert(d.id().to_string());
        }
    }

    /// Drops what the read no longer shows (a change, when it was there before) and
    /// what is no longer registered.
    fn finish(&mut self, entries: &mut HashMap<String, Entry>, ids: &[(String, Trigger)]) {
        for (id, who) in ids {
            if !self.seen.contains(id) && entries.remove(id).is_some() {
                self.tell(id, who);
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
        let asking = [asking.to_string()];
        let mut merge = Merge::new(&asking);
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
    fn a_deployment_two_resources_record_keeps_both_claims() {
        let who = |n: &str| Trigger::new(n).within("ns");
        let mut reg = Registry::default();
        reg.add("d1", &who("a"));
        assert_eq!(reg.claimants("d1"), vec![who("a")]);
        assert!(reg.shared.is_empty(), "one claim is not kept twice");
        reg.add("d1", &who("b"));
        reg.add("d1", &who("a"));
        assert_eq!(reg.claimants("d1").len(), 2);
        // "a" moves to another deployment: "b" still has d1 registered and read.
        reg.drop_claim("d1", &who("a"));
        assert_eq!(reg.claimants("d1"), vec![who("b")]);
        assert_eq!(reg.ids.get("d1"), Some(&who("b")));
        assert!(reg.shared.is_empty());
        // "b" is deleted: d1 is no longer read.
        reg.add("d1", &who("a"));
        reg.forget(&who("b"));
        assert_eq!(reg.claimants("d1"), vec![who("a")]);
        reg.forget(&who("a"));
        assert!(reg.claimants("d1").is_empty() && reg.ids.is_empty() && reg.shared.is_empty());
        assert!(reg.unread.is_empty());
    }

    #[test]
    fn late_registrations_are_read_oldest_first() {
        let mut reg = Registry::default();
        let ids: Vec<String> = (0..450).map(|i| format!("d{i}")).collect();
        reg.unread = ids.clone();
        let page = reg.take_unread(&["d300".to_string()]);
        assert_eq!(page.len(), PAGE);
        assert_eq!(page[0], "d300");
        assert_eq!(page[1..], ids[..PAGE - 1], "then the oldest");
        assert_eq!(reg.unread.len(), 450 - PAGE);
        assert_eq!(reg.unread[0], format!("d{}", PAGE - 1));
        assert!(
            reg.take_unread(&["d300".to_string()]).is_empty(),
            "read already"
        );
        assert!(
            reg.take_unread(&["d5".to_string()]).is_empty(),
            "read already"
        );
        let page = reg.take_unread(&["d449".to_string()]);
        assert_eq!(page.len(), PAGE);
        assert_eq!(reg.unread.len(), 450 - 2 * PAGE);
        let rest = reg.take_unread(&[reg.unread[10].clone()]);
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
