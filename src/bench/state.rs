//! The stored state around a phase: the pairs pre-loaded before it, and what the drain's stream
//! would cost if each distinct trigger were scored exactly once (the floor for coalescing).

use super::{ceilings, load_options, BenchOptions};
use crate::config::Settings;

/// Stores the pre-built pairs of `opts` under `s`'s key prefix.
pub(super) async fn preload(s: &Settings, opts: &BenchOptions) -> anyhow::Result<()> {
    if opts.preload_members == 0 || opts.preload_per_member == 0 {
        return Ok(());
    }
    let store = ceilings::scratch_store(s, &s.output.key_prefix).await?;
    let cands = opts.candidates.max(1);
    let mut batch = Vec::with_capacity(10_000);
    for m in 0..opts.preload_members {
        for j in 0..opts.preload_per_member {
            batch.push(crate::decode::Event::Upsert(crate::decode::PairUpsert {
                member_id: format!("m{m}"),
                candidate_id: format!("c{}", (m * 7 + j * 131) % cands),
                reason: "job_change".into(),
                pair_features: crate::model::FeatureMap::from([(
                    "affinity".to_string(),
                    (j % 10) as f64 / 10.0,
                )]),
                ts: 1_764_000_000_000 - 3_600_000,
            }));
            if batch.len() == 10_000 {
                let refs: Vec<_> = batch.iter().map(|e| (e, 0)).collect();
                store.apply(&refs, s.output.top_n).await?;
                batch.clear();
            }
        }
    }
    let refs: Vec<_> = batch.iter().map(|e| (e, 0)).collect();
    store.apply(&refs, s.output.top_n).await?;
    Ok(())
}

/// Rows per event of the drain's stream if each distinct trigger were scored once: the members
/// updated (each at its final number of pairs), the candidates updated (each at its final
/// reverse-index size) and the distinct pairs upserted. Regenerates the stream from its seed.
pub(super) async fn once_per_trigger(s: &Settings, opts: &BenchOptions) -> anyhow::Result<f64> {
    use std::collections::HashSet;
    let lo = load_options(opts, 0, opts.backlog, 0, true);
    let mut traffic =
        crate::traffic::Traffic::new(lo.seed, lo.members, lo.candidates, lo.zipf, lo.mix);
    let (mut members, mut candidates, mut pairs) = (HashSet::new(), HashSet::new(), HashSet::new());
    for _ in 0..opts.backlog {
        let v = traffic.next(0).value;
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        match (text("entity").as_deref(), text("id")) {
            (Some("member"), Some(id)) => {
                members.insert(id);
            }
            (Some("candidate"), Some(id)) => {
                candidates.insert(id);
            }
            _ => {
                if let (Some(m), Some(c), None) =
                    (text("member_id"), text("candidate_id"), text("op"))
                {
                    pairs.insert((m, c));
                }
            }
        }
    }
    let store = ceilings::scratch_store(s, &s.output.key_prefix).await?;
    let mut conn = store.conn();
    let keys = store.keys();
    let member_keys: Vec<String> = members.iter().map(|m| keys.pairs(m)).collect();
    let candidate_keys: Vec<String> = candidates.iter().map(|c| keys.reverse(c)).collect();
    let rows = pairs.len() as i64
        + sizes(&mut conn, "HLEN", &member_keys).await?
        + sizes(&mut conn, "SCARD", &candidate_keys).await?;
    Ok(rows as f64 / opts.backlog.max(1) as f64)
}

/// The sum of `cmd` (a size command such as HLEN) over `keys`, pipelined in slices.
async fn sizes(conn: &mut crate::store::Conn, cmd: &str, keys: &[String]) -> anyhow::Result<i64> {
    let mut total = 0;
    for chunk in keys.chunks(500) {
        let mut p = redis::pipe();
        for k in chunk {
            p.cmd(cmd).arg(k);
        }
        let n: Vec<i64> = p.query_async(conn).await?;
        total += n.iter().sum::<i64>();
    }
    Ok(total)
}
