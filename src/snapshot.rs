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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The deployment ids resources recorded for this server, and their resources.
    ids: Mutex<HashMap<String, Trigger>>,
    /// The last read and when it was taken; the async lock makes concurrent passes
    /// wait for one read instead of each making their own.
    data: tokio::sync::Mutex<Option<(Instant, HashMap<String, ObservedDeployment>)>>,
}

impl Snapshots {
    fn server(&self, client: &PrefectClient) -> Arc<Server> {
        let mut map = self.servers.lock().expect("snapshots lock");
        map.entry(client.identity()).or_default().clone()
    }

    /// Remembers that resource `who` manages deployment `id` on this client's server.
    pub fn register(&self, client: &PrefectClient, id: &str, who: Trigger) {
        let server = self.server(client);
        server
            .ids
            .lock()
            .expect("snapshot ids lock")
            .insert(id.to_string(), who);
    }

    /// Forgets a deployment (its resource is gone or points elsewhere now).
    pub fn forget(&self, client: &PrefectClient, id: &str) {
        let server = self.server(client);
        server.ids.lock().expect("snapshot ids lock").remove(id);
    }

    /// Forgets whatever resource `who` had registered on any server (it is deleted).
    pub fn forget_resource(&self, who: &Trigger) {
        let servers: Vec<Arc<Server>> = {
            let map = self.servers.lock().expect("snapshots lock");
            map.values().cloned().collect()
        };
        for server in servers {
            let mut ids = server.ids.lock().expect("snapshot ids lock");
            ids.retain(|_, w| w != who);
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
        let fresh = data.as_ref().is_some_and(|(at, _)| at.elapsed() < max_age);
        if !fresh {
            let ids: Vec<(String, Trigger)> = {
                let map = server.ids.lock().expect("snapshot ids lock");
                map.iter().map(|(i, w)| (i.clone(), w.clone())).collect()
            };
            let mut all = HashMap::with_capacity(ids.len());
            for chunk in ids.chunks(PAGE) {
                let page: Vec<String> = chunk.iter().map(|(i, _)| i.clone()).collect();
                for d in client.read_deployments(&page).await? {
                    all.insert(d.id.clone(), d);
                }
            }
            if let Some((_, before)) = data.as_ref() {
                changed(changed_since(before, &all, &ids, id));
            }
            *data = Some((Instant::now(), all));
        }
        Ok(data.as_ref().and_then(|(_, all)| all.get(id).cloned()))
    }
}

/// The resources whose deployment the new read shows updated, or no longer shows,
/// compared with the read before (deployments registered since then are not compared).
fn changed_since(
    before: &HashMap<String, ObservedDeployment>,
    now: &HashMap<String, ObservedDeployment>,
    ids: &[(String, Trigger)],
    asking: &str,
) -> Vec<Trigger> {
    let updated = |d: &ObservedDeployment| d.fields.get("updated").cloned();
    ids.iter()
        .filter(|(id, _)| id != asking)
        .filter(|(id, _)| match (before.get(id), now.get(id)) {
            (Some(b), Some(n)) => updated(b) != updated(n),
            (Some(_), None) => true,
            _ => false,
        })
        .map(|(_, who)| who.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(id: &str, updated: &str) -> (String, ObservedDeployment) {
        let d = serde_json::from_value(json!({"id": id, "updated": updated})).unwrap();
        (id.to_string(), d)
    }

    #[test]
    fn changes_between_two_reads() {
        let before: HashMap<_, _> = [
            deployment("same", "t1"),
            deployment("edited", "t1"),
            deployment("gone", "t1"),
            deployment("asking", "t1"),
        ]
        .into();
        let now: HashMap<_, _> = [
            deployment("same", "t1"),
            deployment("edited", "t2"),
            deployment("asking", "t2"),
            deployment("new", "t1"),
        ]
        .into();
        let who = |n: &str| Trigger::new(n).within("ns");
        let ids: Vec<(String, Trigger)> = ["same", "edited", "gone", "asking", "new"]
            .iter()
            .map(|n| (n.to_string(), who(n)))
            .collect();
        let mut changed = changed_since(&before, &now, &ids, "asking");
        changed.sort_by_key(|t| t.name.clone());
        assert_eq!(changed, vec![who("edited"), who("gone")]);
    }
}
