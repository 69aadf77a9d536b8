//! `rescorer topics apply`: creates the topics described in `topics/topics.toml` that are
//! missing, and reports drift (partition count, configuration) of those that exist. It never
//! deletes, shrinks or reconfigures an existing topic: changing a live topic is an operator's call.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde::Deserialize;

use crate::config::Settings;

/// `topics/topics.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsFile {
    pub topic: Vec<TopicDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicDef {
    /// feature_updates | new_candidates | decay_ticks | dlq | rescore_requests.
    pub role: String,
    /// The default name; the applied name is the configured one for `role`.
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// What `apply` did or found for one topic.
#[derive(Debug, Clone, PartialEq)]
pub enum TopicStatus {
    Created,
    UpToDate,
    /// Exists but differs; each entry says how. Nothing was changed.
    Drift(Vec<String>),
}

impl TopicsFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: TopicsFile =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for t in &file.topic {
            if t.partitions < 1 || t.replication_factor < 1 {
                bail!(
                    "{}: topic role `{}`: partitions and replication_factor must be at least 1",
                    path.display(),
                    t.role
                );
            }
        }
        Ok(file)
    }
}

fn configured_name<'a>(settings: &'a Settings, role: &str) -> anyhow::Result<&'a str> {
    let t = &settings.topics;
    Ok(match role {
        "feature_updates" => &t.feature_updates,
        "new_candidates" => &t.new_candidates,
        "decay_ticks" => &t.decay_ticks,
        "dlq" => &t.dlq,
        "rescore_requests" => &t.rescore_requests,
        other => bail!(
            "unknown topic role `{other}` (feature_updates, new_candidates, decay_ticks, dlq, rescore_requests)"
        ),
    })
}

/// Creates missing topics and reports drift. `replication_override` replaces every
/// `replication_factor` (a single-broker development cluster needs 1).
pub async fn apply(
    settings: &Settings,
    file: &TopicsFile,
    replication_override: Option<i32>,
) -> anyhow::Result<Vec<(String, TopicStatus)>> {
    let admin: AdminClient<DefaultClientContext> = crate::consume::base_config(settings)
        .create()
        .context("creating the Kafka admin client")?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let mut out = Vec::new();
    for def in &file.topic {
        let name = configured_name(settings, &def.role)?.to_owned();
        let metadata = admin
            .inner()
            .fetch_metadata(Some(&name), Duration::from_secs(10))
            .with_context(|| format!("reading metadata of {name}"))?;
        let existing = metadata
            .topics()
            .first()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len() as i32);
        let Some(partitions) = existing else {
            let replication = replication_override.unwrap_or(def.replication_factor);
            let mut new =
                NewTopic::new(&name, def.partitions, TopicReplication::Fixed(replication));
            for (k, v) in &def.config {
                new = new.set(k, v);
            }
            for r in admin.create_topics([&new], &opts).await? {
                r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
            }
            out.push((name, TopicStatus::Created));
            continue;
        };
        let mut drift = Vec::new();
        if partitions != def.partitions {
            drift.push(format!(
                "partitions: {partitions}, defined {}",
                def.partitions
            ));
        }
        match admin
            .describe_configs([&ResourceSpecifier::Topic(&name)], &opts)
            .await
        {
            Ok(results) => {
                if let Some(Ok(res)) = results.into_iter().next() {
                    for (k, want) in &def.config {
                        let have = res.get(k).and_then(|e| e.value.clone());
                        if have.as_deref() != Some(want.as_str()) {
                            drift.push(format!(
                                "{k}: {}, defined {want}",
                                have.unwrap_or_else(|| "unset".into())
                            ));
                        }
                    }
                } else {
                    drift.push("configuration could not be read".into());
                }
            }
            Err(e) => drift.push(format!("configuration could not be read: {e}")),
        }
        out.push((
            name,
            if drift.is_empty() {
                TopicStatus::UpToDate
            } else {
                TopicStatus::Drift(drift)
            },
        ));
    }
    Ok(out)
}

/// The partition count of each topic that owned state needs co-partitioned (the three input
/// topics and the rescore requests), as the broker has them (0: missing).
pub async fn partition_counts(settings: &Settings) -> anyhow::Result<Vec<(String, i32)>> {
    let admin: AdminClient<DefaultClientContext> = crate::consume::base_config(settings)
        .create()
        .context("creating the Kafka admin client")?;
    let t = &settings.topics;
    let mut out = Vec::new();
    for name in [
        &t.feature_updates,
        &t.new_candidates,
        &t.decay_ticks,
        &t.rescore_requests,
    ] {
        let md = admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(10))
            .with_context(|| format!("reading metadata of {name}"))?;
        let n = md
            .topics()
            .first()
            .filter(|t| t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32);
        out.push((name.clone(), n));
    }
    Ok(out)
}

/// Why `counts` do not suit owned state (a member's partition must be the same on every topic),
/// or None when they do.
pub fn count_mismatch(counts: &[(String, i32)]) -> Option<String> {
    let first = counts.first()?.1;
    counts.iter().any(|(_, n)| *n != first).then(|| {
        let list: Vec<String> = counts.iter().map(|(t, n)| format!("{t}={n}")).collect();
        format!(
            "partition counts differ ({}): owned state (state.mode = \"owned\") needs one count",
            list.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_must_agree_for_owned_state() {
        let c = |v: &[i32]| -> Vec<(String, i32)> {
            v.iter()
                .enumerate()
                .map(|(i, n)| (format!("t{i}"), *n))
                .collect()
        };
        assert_eq!(count_mismatch(&c(&[12, 12, 12, 12])), None);
        let why = count_mismatch(&c(&[12, 12, 6, 12])).expect("a mismatch");
        assert!(why.contains("t2=6"), "{why}");
    }
}
