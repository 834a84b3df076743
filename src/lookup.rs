//! The ownership guard's reads by name, coalesced per server. Before creating a
//! deployment the operator must know whether one of that flow and name exists (Prefect's
//! create is an upsert and would take over a stranger's). During a cold start hundreds
//! of passes ask at once; one `GET /deployments/name/{flow}/{name}` each would be a third
//! of all requests.
//!
//! So lookups queue per server (and credentials): while one read is in flight, the
//! lookups that arrive wait, and the next read answers all of them that share a flow
//! name with one `POST /deployments/filter` (up to 200 names). A lone lookup is still
//! the plain GET. Every answer is read after its lookup was asked, so it is as fresh as
//! a GET made at that moment: nothing is created on the word of an older read.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::observed::ObservedDeployment;
use crate::prefect::PrefectClient;
use crate::Result;

/// Names per filter read (Prefect's largest page).
const BATCH: usize = 200;

/// The queues of every server, by client identity.
#[derive(Default)]
pub struct Lookups {
    servers: Mutex<HashMap<String, Arc<Queue>>>,
}

#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    waiting: Vec<Waiter>,
    /// A task is reading for this queue; new lookups only join `waiting`.
    reading: bool,
}

struct Waiter {
    flow: String,
    name: String,
    answer: oneshot::Sender<Answer>,
}

enum Answer {
    Found(Option<ObservedDeployment>),
    /// Read it yourself (a lone lookup, or the shared read failed: the error is then the
    /// lookup's own, with its own retries). The queue waits for `done` to be dropped
    /// when the read was a lone lookup, so one read at a time stays in flight.
    Alone {
        _done: Option<oneshot::Sender<()>>,
    },
}

impl Lookups {
    fn queue(&self, client: &PrefectClient) -> Arc<Queue> {
        let mut map = self.servers.lock().expect("lookups lock");
        // One entry per server and credentials the resources name; bounded all the same.
        if map.len() >= 10_000 {
            map.retain(|_, q| Arc::strong_count(q) > 1);
        }
        map.entry(client.identity()).or_default().clone()
    }

    /// Deployment `flow`/`name` as the server has it now, or `None`.
    pub async fn by_name(
        &self,
        client: &PrefectClient,
        flow: &str,
        name: &str,
    ) -> Result<Option<ObservedDeployment>> {
        let queue = self.queue(client);
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = queue.state.lock().expect("lookup queue lock");
            s.waiting.push(Waiter {
                flow: flow.to_string(),
                name: name.to_string(),
                answer: tx,
            });
            !std::mem::replace(&mut s.reading, true)
        };
        if start {
            tokio::spawn(drain(queue, client.clone()));
        }
        match rx.await {
            Ok(Answer::Found(found)) => Ok(found),
            // `_done` is dropped after the read, releasing the queue.
            Ok(Answer::Alone { _done }) => client.read_deployment_by_name(flow, name).await,
            Err(_) => client.read_deployment_by_name(flow, name).await,
        }
    }
}

/// Answers the queue's lookups until none is left, one read per flow name at a time.
async fn drain(queue: Arc<Queue>, client: PrefectClient) {
    loop {
        let batch = {
            let mut s = queue.state.lock().expect("lookup queue lock");
            match take_batch(&mut s.waiting) {
                Some(b) => b,
                None => {
                    s.reading = false;
                    return;
                }
            }
        };
        answer(&client, batch).await;
    }
}

/// The oldest lookup and up to `BATCH` names of the same flow waiting behind it.
fn take_batch(waiting: &mut Vec<Waiter>) -> Option<Vec<Waiter>> {
    let flow = waiting.first()?.flow.clone();
    let mut names = HashSet::new();
    let mut batch = Vec::new();
    let mut rest = Vec::with_capacity(waiting.len());
    for w in waiting.drain(..) {
        let fits = names.contains(&w.name) || names.len() < BATCH;
        if w.flow == flow && fits {
            names.insert(w.name.clone());
            batch.push(w);
        } else {
            rest.push(w);
        }
    }
    *waiting = rest;
    Some(batch)
}

async fn answer(client: &PrefectClient, mut batch: Vec<Waiter>) {
    let names: Vec<&str> = {
        let mut seen = HashSet::new();
        batch
            .iter()
            .map(|w| w.name.as_str())
            .filter(|n| seen.insert(*n))
            .collect()
    };
    if batch.len() == 1 {
        let (done, released) = oneshot::channel();
        let lone = batch.remove(0);
        let _ = lone.answer.send(Answer::Alone { _done: Some(done) });
        let _ = released.await;
        return;
    }
    let body = serde_json::json!({
        "flows": {"name": {"any_": [&batch[0].flow]}},
        "deployments": {"name": {"any_": names}},
        "limit": BATCH,
        "offset": 0,
    });
    match client.filter_deployments(&body).await {
        Ok(found) => {
            let by_name: HashMap<&str, &ObservedDeployment> = found
                .iter()
                .filter_map(|d| Some((d.fields.get("name")?.as_str()?, d)))
                .collect();
            for w in batch {
                let d = by_name.get(w.name.as_str()).map(|d| (*d).clone());
                let _ = w.answer.send(Answer::Found(d));
            }
        }
        Err(_) => {
            for w in batch {
                let _ = w.answer.send(Answer::Alone { _done: None });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(flow: &str, name: &str) -> Waiter {
        Waiter {
            flow: flow.into(),
            name: name.into(),
            answer: oneshot::channel().0,
        }
    }

    #[test]
    fn a_batch_is_one_flow_and_at_most_a_page_of_names() {
        let mut waiting: Vec<Waiter> = (0..250)
            .map(|i| waiter("f", &format!("d{i}")))
            .chain([waiter("g", "x"), waiter("f", "d0")])
            .collect();
        let first = take_batch(&mut waiting).unwrap();
        assert!(first.iter().all(|w| w.flow == "f"));
        // 200 distinct names, and the repeated "d0" rides along.
        assert_eq!(first.len(), 201);
        let second = take_batch(&mut waiting).unwrap();
        assert_eq!(second.len(), 50);
        let third = take_batch(&mut waiting).unwrap();
        assert_eq!(third.len(), 1);
        assert_eq!(third[0].flow, "g");
        assert!(take_batch(&mut waiting).is_none());
    }
}
