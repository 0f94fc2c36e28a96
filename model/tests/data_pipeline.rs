//! The pipeline from an official-format config: YAML keys parse, both loaders yield the tensors the
//! pre-training model takes, and `file://` object-store URLs read the same lines as local paths.

use xvlm_model::config::ImagesSection;
use xvlm_model::data::loader::StreamState;
use xvlm_model::data::pipeline::{ImageTextLoader, PretrainDataConfig, RegionLoader};
use xvlm_model::data::shard::{Cursor, LineStream, ShardPlan, DEFAULT_MAX_LINE_BYTES};
use xvlm_model::data::store::list_shards;
use xvlm_model::data::synth::{generate, SynthConfig};

/// The data keys of the fixture's official pre-training config deserialise.
#[test]
fn official_config_keys_parse() {
    let path = xvlm_model::fixtures_dir().join("pretrain_swin_bert/config.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let cfg: PretrainDataConfig = serde_yaml::from_str(&text).unwrap();
    assert_eq!(cfg.images.batch_size, 4);
    assert_eq!(cfg.images.keys.image_key, "binary");
    let regions = cfg.regions.unwrap();
    assert_eq!(
        (regions.batch_size, regions.max_images, regions.max_regions),
        (5, 2, 3)
    );
    assert_eq!((cfg.image_res, cfg.max_tokens, cfg.max_masks), (64, 16, 4));
}

/// Without the xvlm-only `images` keys the image-text transform is the official `pretrain_transform`;
/// with them (the demo config) it is softened; a bad `crop_scale` is a config error naming the key.
#[test]
fn images_augmentation_keys() {
    let official: ImagesSection = serde_yaml::from_str("{batch_size: 8}").unwrap();
    let t = official.transform(128).unwrap();
    assert_eq!(
        (t.scale, t.hflip, t.rand_augment.ops.len()),
        ((0.2, 1.0), true, 10)
    );
    let demo: ImagesSection = serde_yaml::from_str(
        "{batch_size: 8, crop_scale: [0.9, 1.0], hflip: False, rand_augment: False}",
    )
    .unwrap();
    let t = demo.transform(128).unwrap();
    assert_eq!(
        (t.scale, t.hflip, t.rand_augment.ops.len()),
        ((0.9, 1.0), false, 0)
    );
    for bad in ["[0.0, 1.0]", "[0.5, 0.5]", "[0.5, 1.5]"] {
        let cfg: ImagesSection =
            serde_yaml::from_str(&format!("{{batch_size: 8, crop_scale: {bad}}}")).unwrap();
        let err = cfg.transform(128).unwrap_err().to_string();
        assert!(err.contains("images.crop_scale"), "{bad}: {err}");
    }
}

fn config(dir: &std::path::Path) -> PretrainDataConfig {
    let yaml = format!(
        r#"
train_file: ["{d}/pretrain/image_text"]
train_file_regions: ["{d}/pretrain/regions"]
images: {{image_key: "binary", is_image_rpath: False, caption_key: "caption", tokenized: False,
         batch_size: 4, num_workers: 2}}
regions: {{image_key: "binary", is_image_rpath: False, caption_key: "caption", tokenized: False,
          iter_perc: 1.0, batch_size: 6, max_images: 2, max_regions: 3, min_perc_in_image: 0.5,
          num_workers: 2}}
image_res: 64
patch_size: 32
max_words: 12
max_tokens: 16
mask_prob: 0.25
max_masks: 3
skipgram_prb: 0.2
skipgram_size: 3
mask_whole_word: True
text_encoder: "{d}"
some_model_key: ignored
"#,
        d = dir.display()
    );
    serde_yaml::from_str(&yaml).unwrap()
}

/// Both loaders of a synthetic corpus yield batches with the names, dtypes and shapes of the
/// `pretrain_swin_bert` fixture batch (at the tiny config's sizes).
#[test]
fn loaders_yield_model_batches() {
    let dir = tempfile::tempdir().unwrap();
    generate(
        dir.path(),
        &SynthConfig {
            images: 30,
            width: 48,
            height: 40,
            ..SynthConfig::default()
        },
    )
    .unwrap();
    let cfg = config(dir.path());
    let mut it = ImageTextLoader::start(&cfg, 0, 2, 1, StreamState::default()).unwrap();
    let (b, state) = it.next_batch().unwrap();
    let shapes: Vec<(&str, Vec<i64>, tch::Kind)> = b
        .named()
        .into_iter()
        .map(|(n, t)| (n, t.size(), t.kind()))
        .collect();
    assert_eq!(
        shapes,
        vec![
            ("image", vec![4, 3, 64, 64], tch::Kind::Float),
            ("text_ids", vec![4, 16], tch::Kind::Int64),
            ("text_atts", vec![4, 16], tch::Kind::Int64),
            ("text_ids_masked", vec![4, 16], tch::Kind::Int64),
            ("masked_pos", vec![4, 3], tch::Kind::Int64),
            ("masked_ids", vec![4, 3], tch::Kind::Int64),
        ]
    );
    assert_eq!(state.batches, 1);
    let cls: Vec<i64> = Vec::try_from(&b.text_ids.select(1, 0)).unwrap();
    assert!(
        cls.iter().all(|&c| c == 101),
        "texts start with [CLS]: {cls:?}"
    );

    let mut rg = RegionLoader::start(&cfg, 1, 2, 1, StreamState::default()).unwrap();
    let (r, _) = rg.next_batch().unwrap();
    let shapes: Vec<(&str, Vec<i64>)> = r.named().into_iter().map(|(n, t)| (n, t.size())).collect();
    assert_eq!(
        shapes,
        vec![
            ("image", vec![2, 3, 64, 64]),
            ("idx_to_group_img", vec![6]),
            ("text_ids", vec![6, 16]),
            ("text_atts", vec![6, 16]),
            ("text_ids_masked", vec![6, 16]),
            ("masked_pos", vec![6, 3]),
            ("masked_ids", vec![6, 3]),
            ("image_atts", vec![6, 5]),
            ("target_bbox", vec![6, 4]),
            ("is_image", vec![6]),
        ]
    );
    assert_eq!(r.target_bbox.kind(), tch::Kind::Float);
}

/// `synth-data` writes the data keys of a pre-training config that the loaders accept as they are.
#[test]
fn synthetic_corpus_config_loads() {
    let dir = tempfile::tempdir().unwrap();
    let summary = generate(
        dir.path(),
        &SynthConfig {
            images: 20,
            width: 40,
            height: 32,
            ..SynthConfig::default()
        },
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.path().join("pretrain_data.yaml")).unwrap();
    let cfg: PretrainDataConfig = serde_yaml::from_str(&text).unwrap();
    assert!(
        text.contains(&format!("train_dataset_size: {}", summary.splits[0])),
        "{text}"
    );
    let mut it = ImageTextLoader::start(&cfg, 0, 1, 0, StreamState::default()).unwrap();
    assert_eq!(
        it.next_batch().unwrap().0.image.size(),
        vec![4, 3, 128, 128]
    );
    let mut rg = RegionLoader::start(&cfg, 0, 1, 0, StreamState::default()).unwrap();
    assert_eq!(rg.next_batch().unwrap().0.image_atts.size(), vec![6, 17]);
}

/// A `file://` URL goes through object_store and reads the same lines (and resumes at a byte offset).
#[test]
fn file_urls_read_like_local_paths() {
    let dir = tempfile::tempdir().unwrap();
    generate(
        dir.path(),
        &SynthConfig {
            images: 20,
            width: 40,
            height: 32,
            shards: 3,
            ..SynthConfig::default()
        },
    )
    .unwrap();
    let local = vec![dir.path().join("pretrain/image_text").display().to_string()];
    let url = vec![format!(
        "file://{}",
        dir.path().join("pretrain/image_text").display()
    )];
    let read = |entries: &Vec<String>, cursor: Cursor, n: usize| {
        let plan = ShardPlan::new(list_shards(entries).unwrap(), 0, 1, 2).unwrap();
        let mut s = LineStream::new(plan, cursor, DEFAULT_MAX_LINE_BYTES);
        (0..n)
            .map(|_| s.next_line().unwrap())
            .map(|l| (l.id, l.bytes.unwrap(), l.next))
            .collect::<Vec<_>>()
    };
    let a = read(&local, Cursor::default(), 20);
    let b = read(&url, Cursor::default(), 20);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.0, &x.1), (y.0, &y.1));
    }
    // Resume from the middle of a file through a ranged GET.
    let mid = a.iter().position(|x| x.2.line > 0).unwrap();
    let resumed = read(&url, a[mid].2, 5);
    for (k, r) in resumed.iter().enumerate() {
        assert_eq!(r.1, a[mid + 1 + k].1);
    }
    // Resume from every cursor, including one at the very end of a file (a store refuses a range
    // starting at the object's size).
    for k in 0..a.len() - 1 {
        let next = read(&url, a[k].2, 1);
        assert_eq!(next[0].1, a[k + 1].1, "resumed from after line {k}");
    }
    let missing = list_shards(&[format!("file://{}/nope", dir.path().display())]).unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
}

/// `is_image_rpath`: images are files under the image root; a path that leaves the root is a skip.
#[test]
fn image_paths_resolve_under_the_root() {
    use std::sync::Arc;
    use xvlm_model::config::RecordKeys;
    use xvlm_model::data::loader::Processor;
    use xvlm_model::data::masking::MaskConfig;
    use xvlm_model::data::rng::{rng_for, Purpose};
    use xvlm_model::data::sample::{ImageTextProcessor, TextPipeline};
    use xvlm_model::data::tokenizer::TextTokenizer;
    use xvlm_model::data::transform::TrainTransform;
    use xvlm_model::data::DataError;

    let dir = tempfile::tempdir().unwrap();
    generate(
        dir.path(),
        &SynthConfig {
            images: 10,
            width: 40,
            height: 32,
            ..SynthConfig::default()
        },
    )
    .unwrap();
    let processor = ImageTextProcessor {
        keys: RecordKeys {
            image_key: "image".into(),
            is_image_rpath: true,
            image_root: Some(dir.path().to_path_buf()),
            ..RecordKeys::default()
        },
        text: TextPipeline {
            tokenizer: Arc::new(
                TextTokenizer::from_vocab_txt(&dir.path().join("vocab.txt")).unwrap(),
            ),
            max_words: 12,
            max_tokens: 16,
            mask: MaskConfig::default(),
            tokenized: false,
        },
        transform: TrainTransform::pretrain(32),
    };
    let mut rng = rng_for(0, Purpose::Sample, &[]);
    let ok = br#"{"image": "images/000003.jpg", "caption": "a red circle"}"#;
    assert_eq!(
        processor.process(ok, &mut rng).unwrap().image.len(),
        3 * 32 * 32
    );
    for bad in [
        &br#"{"image": "../images/000003.jpg", "caption": "a red circle"}"#[..],
        &br#"{"image": "/etc/hostname", "caption": "a red circle"}"#[..],
        &br#"{"image": "images/missing.jpg", "caption": "a red circle"}"#[..],
    ] {
        assert!(matches!(
            processor.process(bad, &mut rng),
            Err(DataError::Sample(_))
        ));
    }
}
