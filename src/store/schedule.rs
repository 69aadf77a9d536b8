//! The owned decay schedule (`pdue:{part-p}`): one entry per member, scored at its earliest due
//! pair; written with each window, read by a partition's decay tick in due order.

use std::collections::HashMap;

use redis::Cmd;

use super::state::protocol;
use super::{Store, StoreError};

impl Store {
    /// The schedule's changes as `ZADD`s and `ZREM`s per partition: a member scheduled at its
    /// earliest due pair, and entries removed (members, or pair entries of the earlier layout).
    pub(super) fn schedule_cmds(
        &self,
        due: &[(i32, &str, i64)],
        unscheduled: &[(i32, &str)],
    ) -> Vec<Cmd> {
        let mut schedule: Vec<Cmd> = Vec::new();
        let mut adds: HashMap<i32, Vec<(i64, &str)>> = HashMap::new();
        for (p, m, at) in due {
            adds.entry(*p).or_default().push((*at, m));
        }
        let mut rems: HashMap<i32, Vec<&str>> = HashMap::new();
        for (p, e) in unscheduled {
            rems.entry(*p).or_default().push(e);
        }
        for (p, entries) in adds {
            for chunk in entries.chunks(512) {
                let mut z = redis::cmd("ZADD");
                z.arg(self.keys.partition_due(p));
                for (at, e) in chunk {
                    z.arg(at).arg(e);
                }
                schedule.push(z);
            }
        }
        for (p, entries) in rems {
            for chunk in entries.chunks(512) {
                let mut z = redis::cmd("ZREM");
                z.arg(self.keys.partition_due(p)).arg(chunk);
                schedule.push(z);
            }
        }
        schedule
    }

    /// Up to `limit` pairs of member partition `partition` due at or before `until` (ms).
    pub async fn partition_due(
        &self,
        partition: i32,
        until: i64,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let due = self
            .partition_due_after(partition, None, until, limit)
            .await?;
        Ok(due.into_iter().map(|(e, _)| e).collect())
    }

    /// Up to `limit` entries of `partition`'s schedule due after `after` (exclusive; None: from
    /// the start) and by `until`, in due order, with their due times: a walk that goes on while
    /// the writes of its earlier chunks are in flight.
    pub async fn partition_due_after(
        &self,
        partition: i32,
        after: Option<i64>,
        until: i64,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let mut c = self.conn();
        let r = redis::cmd("ZRANGE")
            .arg(self.keys.partition_due(partition))
            .arg(after.map_or_else(|| "-inf".to_owned(), |a| format!("({a}")))
            .arg(until)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES")
            .query_async::<Vec<String>>(&mut c)
            .await;
        let raw = self.checked(r).await?;
        raw.chunks(2)
            .map(|e| {
                let [entry, at] = e else {
                    return Err(protocol("due entry", "odd reply"));
                };
                let at = at.parse::<f64>().map_err(|e| protocol("due time", e))?;
                Ok((entry.clone(), at as i64))
            })
            .collect()
    }
}
