//! Reading a job's event files back as the progress reports they were written from, so that a
//! restarted coordinator's dashboard shows the curves of before the restart. Values come back as
//! TensorBoard stores them (f32). A session START begins a new generation, as it did when written.

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStoreExt;
use xvlm_proto::storage::Located;
use xvlm_proto::v1;

use super::event::{read_records, Payload, ValueKind};
use super::DIR;
use crate::error::CoordError;

/// The reports stored under `{output}/tensorboard/`, segment by segment in name (write) order;
/// none when the folder does not exist. A segment that cannot be read is an error naming it.
pub async fn read_history(store: &Located, job: &str) -> Result<Vec<v1::RankProgress>, CoordError> {
    let dir = ObjectPath::from_iter(store.path.parts().chain([DIR.into()]));
    let err = |what: &dyn std::fmt::Display, reason: String| {
        CoordError::Server(format!("TensorBoard history {what}: {reason}"))
    };
    let mut segments: Vec<ObjectPath> = store
        .store
        .list(Some(&dir))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await
        .map_err(|e| err(&dir, e.to_string()))?;
    segments.retain(|p| p.filename().is_some_and(|f| f.contains(".tfevents.")));
    segments.sort();
    let mut reports = Vec::new();
    let mut generation = 0;
    for path in segments {
        let bytes = store
            .store
            .get(&path)
            .await
            .map_err(|e| err(&path, e.to_string()))?
            .bytes()
            .await
            .map_err(|e| err(&path, e.to_string()))?;
        let events = read_records(&bytes).map_err(|e| err(&path, e.to_string()))?;
        for event in events {
            match event.payload {
                Some(Payload::SessionLog(_)) => generation += 1,
                Some(Payload::Summary(summary)) => {
                    let values = summary.value.into_iter().filter_map(|v| match v.value {
                        Some(ValueKind::SimpleValue(x)) => Some((v.tag, x)),
                        None => None,
                    });
                    let step = u64::try_from(event.step).unwrap_or(0);
                    reports.push(report_of(job, generation, step, values));
                }
                Some(Payload::FileVersion(_)) | None => {}
            }
        }
    }
    Ok(reports)
}

/// The progress report whose scalars (`super::scalars`) these are.
fn report_of(
    job: &str,
    generation: u64,
    step: u64,
    values: impl Iterator<Item = (String, f32)>,
) -> v1::RankProgress {
    let mut p = v1::RankProgress {
        job_id: job.to_string(),
        generation,
        step,
        ..Default::default()
    };
    let mut lrs = Vec::new();
    for (tag, value) in values {
        let value = f64::from(value);
        if let Some(name) = tag.strip_prefix("loss/") {
            p.losses.push(v1::Loss {
                name: name.to_string(),
                value,
            });
        } else if let Some(name) = tag.strip_prefix("eval/") {
            p.metrics.push(v1::Metric {
                name: name.to_string(),
                value,
            });
        } else if let Some(group) = tag.strip_prefix("lr/group") {
            if let Ok(i) = group.parse::<usize>() {
                lrs.push((i, value));
            }
        } else {
            match tag.as_str() {
                "lr" => p.lr = value,
                "grad_norm" => p.grad_norm = Some(value),
                "samples_per_sec" => p.samples_per_sec = value,
                _ => {}
            }
        }
    }
    lrs.sort_by_key(|(i, _)| *i);
    p.lrs = lrs.into_iter().map(|(_, v)| v).collect();
    if let Some(first) = p.lrs.first() {
        p.lr = *first;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::super::{temp_output, JobEvents};
    use super::*;
    use crate::curves::Curves;

    fn report(generation: u64, step: u64) -> v1::RankProgress {
        v1::RankProgress {
            job_id: "job-0001".into(),
            generation,
            step,
            losses: vec![
                v1::Loss {
                    name: "itc".into(),
                    value: 1.0 / step as f64,
                },
                v1::Loss {
                    name: "zero".into(),
                    value: 0.0,
                },
            ],
            lr: 0.25,
            lrs: vec![0.25, 0.5],
            grad_norm: Some(3.0),
            samples_per_sec: 8.0,
            ..Default::default()
        }
    }

    fn evaluation(generation: u64, step: u64) -> v1::RankProgress {
        v1::RankProgress {
            job_id: "job-0001".into(),
            generation,
            step,
            metrics: vec![v1::Metric {
                name: "val.r_mean".into(),
                value: 40.5,
            }],
            ..Default::default()
        }
    }

    /// A run with a resume, written in three segments, reads back as the same curve the dashboard
    /// drew live (values rounded to f32), with the resumed steps counted once.
    #[test]
    fn written_segments_restore_the_live_curve() {
        let (_dir, output, runtime) = temp_output();
        let reports: Vec<v1::RankProgress> = (1..=6)
            .map(|s| report(1, s))
            .chain([evaluation(1, 6)])
            .chain((4..=9).map(|s| report(2, s)))
            .chain([evaluation(2, 9)])
            .collect();
        let live = Curves::default();
        let mut events = JobEvents::open(&output);
        runtime.block_on(async {
            for (i, r) in reports.iter().enumerate() {
                live.add(r);
                events.add(r);
                if i % 5 == 4 {
                    events.flush().await;
                }
            }
            events.flush().await;
        });
        let store = xvlm_proto::storage::open(&output, &[]).unwrap();
        let history = runtime.block_on(read_history(&store, "job-0001")).unwrap();
        assert_eq!(history.len(), reports.len());
        assert_eq!(history[7].lrs, vec![0.25, 0.5]);
        assert_eq!(history[7].grad_norm, Some(3.0));
        let restored = Curves::default();
        restored.restore("job-0001", history);
        let live = live.of("job-0001");
        let restored = restored.of("job-0001");
        let steps =
            |c: &crate::curves::JobCurve| c.points.iter().map(|p| p.step).collect::<Vec<_>>();
        assert_eq!(steps(&restored), (1..=9).collect::<Vec<_>>());
        assert_eq!(steps(&restored), steps(&live));
        for (a, b) in restored.points.iter().zip(&live.points) {
            assert_eq!(a.lr, b.lr);
            assert_eq!(a.losses.len(), b.losses.len());
            for ((na, va), (nb, vb)) in a.losses.iter().zip(&b.losses) {
                assert_eq!(na, nb);
                assert_eq!(*va, f64::from(*vb as f32));
            }
        }
        assert_eq!(restored.evaluations, live.evaluations);
        assert_eq!(restored.evaluations.len(), 1, "step 6's was run again");
    }

    /// No folder is no history; a damaged segment is an error naming the file.
    #[test]
    fn missing_folder_is_empty_and_damage_is_an_error() {
        let (dir, output, runtime) = temp_output();
        let store = xvlm_proto::storage::open(&output, &[]).unwrap();
        assert!(runtime
            .block_on(read_history(&store, "j"))
            .unwrap()
            .is_empty());
        let tb = dir.path().join("job").join(DIR);
        std::fs::create_dir_all(&tb).unwrap();
        let mut bytes = Vec::new();
        super::super::event::append_record(
            &mut bytes,
            &super::super::event::Event::file_version(1.0),
        );
        bytes.truncate(bytes.len() - 2);
        std::fs::write(
            tb.join("events.out.tfevents.0000000000001.000000.xvlm-coord"),
            bytes,
        )
        .unwrap();
        let err = runtime
            .block_on(read_history(&store, "j"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("events.out.tfevents.0000000000001") && err.contains("cut off"),
            "{err}"
        );
    }
}
