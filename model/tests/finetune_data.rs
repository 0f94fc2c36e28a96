//! Fine-tuning data: the sampler's per-epoch permutation and rank slicing, evaluation slices, resumable
//! and thread-independent loading, the retrieval loader and eval split against the official tensors of
//! the `finetune_data` fixture, and hostile annotation files (errors that name the file and the item).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use tch::{Kind, Tensor};
use xvlm_model::data::finetune::images::ImageTransform;
use xvlm_model::data::finetune::nlvr::{self, NlvrDataConfig};
use xvlm_model::data::finetune::source::ImageRoot;
use xvlm_model::data::finetune::{
    eval_slice, RetrievalData, RetrievalDataConfig, RetrievalEvalSet, RetrievalLoaderOptions,
    RetrievalTrainData, RetrievalTrainLoader, RetrievalTrainSet, TrainCursor, TrainSampler,
};
use xvlm_model::data::tokenizer::TextTokenizer;
use xvlm_model::data::DataError;

fn case_dir() -> PathBuf {
    xvlm_model::fixtures_dir().join("finetune_data")
}

fn tokenizer() -> Arc<TextTokenizer> {
    Arc::new(TextTokenizer::from_vocab_txt(&case_dir().join("vocab.txt")).expect("vocab"))
}

fn expected() -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(case_dir().join("expected.safetensors"))
        .expect("expected tensors")
        .into_iter()
        .collect()
}

fn retrieval_config() -> RetrievalDataConfig {
    RetrievalDataConfig::load(&case_dir().join("config_re.yaml")).expect("config_re.yaml")
}

/// The data keys read from a parsed official task config equal those read from the file itself.
#[test]
fn retrieval_keys_from_a_task_config() {
    let path = case_dir().join("config_re.yaml");
    let text = std::fs::read_to_string(&path).unwrap() + "patch_size: 32\ntext_config: 'x.json'\n";
    let task = xvlm_model::config::TaskConfig::parse(&text, &path).unwrap();
    let from_task = RetrievalDataConfig::from_task_config(&task).unwrap();
    let direct = retrieval_config();
    assert_eq!(from_task.train_file, direct.train_file);
    assert_eq!(from_task.test_file, direct.test_file);
    assert_eq!(from_task.image_root, direct.image_root);
    assert_eq!((from_task.max_tokens, from_task.max_words), (12, 30));
}

/// Every rank gets `floor(N / G)` equal batches; per epoch an item appears at most once over all ranks,
/// exactly `steps x G` items are read (the tail is dropped), and the permutation differs per epoch.
#[test]
fn sampler_slices_equal_batches_and_drops_the_tail() {
    for n in [7usize, 10, 23, 64] {
        for world in 1..=4 {
            for batch in [1usize, 2, 3] {
                if n < batch * world {
                    assert!(TrainSampler::new(n, batch, 0, world, 5).is_err());
                    continue;
                }
                let samplers: Vec<TrainSampler> = (0..world)
                    .map(|r| TrainSampler::new(n, batch, r, world, 5).unwrap())
                    .collect();
                let steps = samplers[0].steps_per_epoch();
                assert_eq!(steps as usize, n / (batch * world));
                assert_eq!(
                    samplers[0].schedule_steps_per_epoch() as usize,
                    n.div_ceil(batch * world)
                );
                for epoch in 0..3 {
                    let mut seen = HashSet::new();
                    for s in &samplers {
                        for b in 0..steps {
                            let idx = s.batch_indices(TrainCursor { epoch, batch: b });
                            assert_eq!(idx.len(), batch);
                            for i in idx {
                                assert!(i < n);
                                assert!(seen.insert(i), "item {i} twice in epoch {epoch}");
                            }
                        }
                    }
                    assert_eq!(seen.len(), steps as usize * batch * world);
                }
                let p0 = samplers[0].permutation(0);
                let mut sorted = p0.clone();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..n).collect::<Vec<_>>());
                if n > 3 {
                    assert_ne!(p0, samplers[0].permutation(1), "epochs share an order");
                }
            }
        }
    }
}

/// The cursor walks the epoch and rolls over; past-the-end cursors are refused.
#[test]
fn cursor_rolls_over_epochs() {
    let s = TrainSampler::new(10, 3, 0, 1, 1).unwrap();
    assert_eq!(s.steps_per_epoch(), 3);
    let mut c = TrainCursor::default();
    let mut visited = Vec::new();
    for _ in 0..7 {
        visited.push((c.epoch, c.batch));
        c = s.next(c);
    }
    assert_eq!(
        visited,
        vec![(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    );
    assert!(s.check(TrainCursor { epoch: 0, batch: 3 }).is_err());
}

/// Evaluation slices of world 1..4 cover every item exactly once, contiguous, sizes within one.
#[test]
fn eval_slices_cover_every_item_once() {
    for n in [0usize, 1, 3, 7, 10, 101] {
        for world in 1..=4 {
            let slices: Vec<_> = (0..world).map(|r| eval_slice(n, r, world)).collect();
            let items: Vec<usize> = slices.iter().flat_map(|s| s.clone()).collect();
            assert_eq!(items, (0..n).collect::<Vec<_>>(), "n {n} world {world}");
            let sizes: Vec<usize> = slices.iter().map(|s| s.len()).collect();
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 1);
        }
    }
}

fn train_loader(
    transform: ImageTransform,
    truncate_to: Option<usize>,
    batch: usize,
    threads: usize,
    cursor: TrainCursor,
) -> RetrievalTrainLoader {
    let cfg = retrieval_config();
    let set = RetrievalTrainSet::load(
        &cfg.train_file,
        &ImageRoot(cfg.image_root.clone()),
        cfg.max_words,
    )
    .unwrap();
    let data = RetrievalTrainData {
        set: Arc::new(set),
        tokenizer: tokenizer(),
        transform,
        truncate_to,
    };
    let opts = RetrievalLoaderOptions {
        batch_per_rank: batch,
        rank: 0,
        world: 1,
        seed: 11,
        threads,
        prefetch_batches: 2,
    };
    RetrievalTrainLoader::start(data, opts, cursor).unwrap()
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.equal(b)
}

/// With the test transform and the official no-truncation call, every row of a shuffled batch equals
/// the official tensors of its item: images within the case tolerance, ids, masks and idx exactly.
#[test]
fn retrieval_loader_matches_the_fixture() {
    let exp = expected();
    let mut loader = train_loader(ImageTransform::test(64), None, 6, 2, TrainCursor::default());
    assert_eq!(loader.sampler().steps_per_epoch(), 1);
    let b = loader.next_batch().unwrap();
    assert_eq!(b.cursor, TrainCursor::default());
    assert_eq!(b.next, TrainCursor { epoch: 1, batch: 0 });
    let order = Tensor::from_slice(&b.indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let want_ids = exp["re_train.text_ids"].index_select(0, &order);
    assert!(same(&b.batch.text_ids, &want_ids));
    assert!(same(
        &b.batch.text_atts,
        &exp["re_train.text_atts"].index_select(0, &order)
    ));
    assert!(same(
        &b.batch.idx,
        &exp["re_train.idx"].index_select(0, &order)
    ));
    let image_index = exp["re_train.image_index"].index_select(0, &order);
    for (row, k) in Vec::<i64>::try_from(&image_index)
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let want = &exp[&format!("image{k}.tensor")];
        let diff = (b.batch.image.get(row as i64) - want)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff <= 0.016, "row {row}: max abs {diff}");
    }
    // DESIGN fix 16 (the default): the same rows truncated to max_tokens.
    let max_tokens = retrieval_config().max_tokens as i64;
    let mut cut = train_loader(
        ImageTransform::test(64),
        Some(max_tokens as usize),
        6,
        1,
        TrainCursor::default(),
    );
    let c = cut.next_batch().unwrap();
    assert_eq!(c.indices, b.indices);
    assert_eq!(c.batch.text_ids.size()[1], max_tokens);
    assert!(same(&c.batch.text_ids, &want_ids.narrow(1, 0, max_tokens)));
}

/// Resuming from a batch's `next` cursor yields the same batches as the uninterrupted stream, and
/// the content (random augmentation included) does not depend on the number of loader threads.
#[test]
fn resume_and_thread_count_give_the_same_batches() {
    let mut full = train_loader(
        ImageTransform::train(64),
        Some(12),
        2,
        1,
        TrainCursor::default(),
    );
    let batches: Vec<_> = (0..5).map(|_| full.next_batch().unwrap()).collect();
    assert_eq!(batches[3].cursor, TrainCursor { epoch: 1, batch: 0 });
    let mut resumed = train_loader(ImageTransform::train(64), Some(12), 2, 3, batches[1].next);
    for want in &batches[2..] {
        let got = resumed.next_batch().unwrap();
        assert_eq!(got.cursor, want.cursor);
        assert_eq!(got.indices, want.indices);
        assert!(same(&got.batch.image, &want.batch.image));
        assert!(same(&got.batch.text_ids, &want.batch.text_ids));
        assert!(same(&got.batch.idx, &want.batch.idx));
    }
    // Epoch 0 (batches 0..3) covers all six items: an epoch-1 item was augmented differently then.
    let item = batches[3].indices[0];
    let (earlier, p) = batches[..3]
        .iter()
        .find_map(|b| b.indices.iter().position(|&x| x == item).map(|p| (b, p)))
        .expect("epoch 0 reads every item");
    assert!(!same(
        &earlier.batch.image.get(p as i64),
        &batches[3].batch.image.get(0)
    ));
}

/// The eval split: texts, txt2img / img2txt and max_length tokenization as the official tensors; the
/// images of the rank slices at world 2 and 3 together equal the whole split.
#[test]
fn retrieval_eval_split_matches_the_fixture() {
    let exp = expected();
    let cfg = retrieval_config();
    let data = RetrievalData::load(&cfg, tokenizer()).unwrap();
    let test = data.test.as_ref().unwrap();
    let t = test.tokenize_texts(0..test.num_texts()).unwrap();
    assert!(same(&t.ids, &exp["re_test.text_ids"]));
    assert!(same(&t.atts, &exp["re_test.text_atts"]));
    assert!(same(&test.img2txt_padded(), &exp["re_test.img2txt"]));
    let txt2img: Vec<i64> = test.txt2img.iter().map(|&i| i as i64).collect();
    assert!(same(&Tensor::from_slice(&txt2img), &exp["re_test.txt2img"]));
    let all = test.load_image_range(0..test.num_images(), 2).unwrap();
    for world in [2, 3] {
        let parts: Vec<Tensor> = (0..world)
            .map(|r| {
                test.load_image_range(eval_slice(test.num_images(), r, world), 1)
                    .unwrap()
            })
            .collect();
        assert!(same(&Tensor::cat(&parts, 0), &all));
    }
    for (row, k) in Vec::<i64>::try_from(&exp["re_test.image_index"])
        .unwrap()
        .into_iter()
        .enumerate()
    {
        let d = (all.get(row as i64) - &exp[&format!("image{k}.tensor")])
            .abs()
            .max()
            .double_value(&[]);
        assert!(d <= 0.016);
    }
    assert_eq!(data.train.num_image_ids, 3);
    assert!(data.val.is_some());
    assert_eq!(all.kind(), Kind::Float);
}

// ---------------------------------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------------------------------

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

fn with_image(dir: &Path) -> ImageRoot {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    std::fs::copy(
        case_dir().join("images/coco/img_a.jpg"),
        dir.join("img/ok.jpg"),
    )
    .unwrap();
    std::fs::write(dir.join("img/garbage.jpg"), b"\xff\xd8 not really a jpeg").unwrap();
    ImageRoot(dir.join("img").display().to_string())
}

fn annotation_error(e: DataError) -> (String, Option<usize>, String) {
    match e {
        DataError::Annotation {
            file,
            index,
            reason,
        } => (file, index, reason),
        other => panic!("expected an annotation error, got {other}"),
    }
}

/// Each bad retrieval file gives an error naming the file and (for item problems) the index.
#[test]
fn hostile_retrieval_files_name_file_and_item() {
    let tmp = tempfile::tempdir().unwrap();
    let root = with_image(tmp.path());
    let ok = json!({"image": "ok.jpg", "caption": "a dog", "image_id": 1});
    let cases: Vec<(&str, String, Option<usize>, &str)> = vec![
        ("invalid.json", "[{\"image\": ".into(), None, "invalid JSON"),
        (
            "object.json",
            "{\"a\": 1}".into(),
            None,
            "expected a JSON list",
        ),
        (
            "missing.json",
            json!([ok, {"image": "ok.jpg", "image_id": 2}]).to_string(),
            Some(1),
            "missing field `caption`",
        ),
        (
            "wrongtype.json",
            json!([ok, ok, {"image": 3, "caption": "x", "image_id": 2}]).to_string(),
            Some(2),
            "field `image` must be a string",
        ),
        (
            "empty.json",
            json!([{"image": "ok.jpg", "caption": "?!.", "image_id": 1}]).to_string(),
            Some(0),
            "empty after pre_caption",
        ),
        (
            "noimage.json",
            json!([ok, {"image": "absent.jpg", "caption": "x", "image_id": 1}]).to_string(),
            Some(1),
            "missing",
        ),
        (
            "escape.json",
            json!([{"image": "../ok.jpg", "caption": "x", "image_id": 1}]).to_string(),
            Some(0),
            "leaves the image root",
        ),
        (
            "notobject.json",
            json!([ok, "just a string"]).to_string(),
            Some(1),
            "expected an object",
        ),
    ];
    for (name, body, index, why) in cases {
        let file = write(tmp.path(), name, &body);
        let err = RetrievalTrainSet::load(std::slice::from_ref(&file), &root, 30).expect_err(name);
        let (f, i, reason) = annotation_error(err);
        assert_eq!(f, file, "{name}");
        assert_eq!(i, index, "{name}: {reason}");
        assert!(reason.contains(why), "{name}: {reason}");
    }
    let missing = tmp.path().join("nope.json").display().to_string();
    assert!(matches!(
        RetrievalTrainSet::load(&[missing], &root, 30),
        Err(DataError::MissingFile(_))
    ));
}

/// An undecodable image stops the loader with an error naming the annotation file and item.
#[test]
fn unreadable_image_is_an_error_naming_the_item() {
    let tmp = tempfile::tempdir().unwrap();
    let root = with_image(tmp.path());
    let file = write(
        tmp.path(),
        "train.json",
        &json!([
            {"image": "ok.jpg", "caption": "a dog", "image_id": 1},
            {"image": "garbage.jpg", "caption": "a cat", "image_id": 2},
        ])
        .to_string(),
    );
    let set = RetrievalTrainSet::load(std::slice::from_ref(&file), &root, 30).unwrap();
    let data = RetrievalTrainData {
        set: Arc::new(set),
        tokenizer: tokenizer(),
        transform: ImageTransform::train(32),
        truncate_to: Some(12),
    };
    let opts = RetrievalLoaderOptions {
        batch_per_rank: 2,
        rank: 0,
        world: 1,
        seed: 0,
        threads: 2,
        prefetch_batches: 1,
    };
    let mut loader = RetrievalTrainLoader::start(data, opts, TrainCursor::default()).unwrap();
    let (f, i, reason) = annotation_error(loader.next_batch().unwrap_err());
    assert_eq!((f.as_str(), i), (file.as_str(), Some(1)));
    assert!(reason.contains("garbage.jpg"), "{reason}");
    assert!(
        loader.next_batch().is_err(),
        "the stream stops after an error"
    );

    // Evaluation images too.
    let eval = write(
        tmp.path(),
        "test.json",
        &json!([{"image": "ok.jpg", "caption": ["a"]}, {"image": "garbage.jpg", "caption": ["b"]}])
            .to_string(),
    );
    let mut cfg = retrieval_config();
    cfg.image_res = 32;
    let set = RetrievalEvalSet::load(&eval, &root, &cfg, tokenizer()).unwrap();
    assert!(set.load_images(&[0], 1).is_ok());
    let (f, i, _) = annotation_error(set.load_images(&[0, 1], 2).unwrap_err());
    assert_eq!((f.as_str(), i), (eval.as_str(), Some(1)));
}

/// NLVR2 labels other than 'True' / 'False' and pairs that are not two images are errors.
#[test]
fn hostile_nlvr_items_name_file_and_item() {
    let tmp = tempfile::tempdir().unwrap();
    let root = with_image(tmp.path());
    let cfg = NlvrDataConfig {
        train_file: Vec::new(),
        val_file: Vec::new(),
        test_file: Vec::new(),
        image_root: root.0.clone(),
        image_res: 32,
        max_words: 30,
        finetune_transform: Default::default(),
    };
    let good = json!({"images": ["ok.jpg", "ok.jpg"], "sentence": "two", "label": "True"});
    for (body, why) in [
        (
            json!([good, {"images": ["ok.jpg", "ok.jpg"], "sentence": "x", "label": "true"}]),
            "'True' or 'False'",
        ),
        (
            json!([good, {"images": ["ok.jpg"], "sentence": "x", "label": "True"}]),
            "not 2",
        ),
    ] {
        let file = write(tmp.path(), "nlvr.json", &body.to_string());
        let (f, i, reason) =
            annotation_error(nlvr::load_split(&cfg, std::slice::from_ref(&file)).unwrap_err());
        assert_eq!((f, i), (file, Some(1)));
        assert!(reason.contains(why), "{reason}");
    }
}

/// VQA, RefCOCO+ and REFER problems: errors name the file and the item.
#[test]
fn hostile_vqa_and_grounding_items_name_file_and_item() {
    use xvlm_model::data::finetune::grounding::{self, GroundingDataConfig};
    use xvlm_model::data::finetune::vqa::{self, VqaDataConfig};
    let tmp = tempfile::tempdir().unwrap();
    let root = with_image(tmp.path());
    let q = json!({"image": "ok.jpg", "question": "what?", "answer": ["a"], "dataset": "vqa"});
    let cases = [
        (
            json!([q, {"image": "ok.jpg", "question": "q", "answer": ["a"], "dataset": "coco"}]),
            "'vqa', 'vg' or 'gqa'",
        ),
        (
            json!([q, {"image": "ok.jpg", "question": "q", "answer": ["a", 3]}]),
            "`answer`[1] must be a string",
        ),
        (
            json!([q, {"image": "ok.jpg", "question": "q", "answer": ["a"], "dataset": "vg"}]),
            "field `answer` must be a string",
        ),
        (
            json!([q, {"image": "ok.jpg", "question": "q", "answer": "a", "dataset": "vg"}]),
            "no image root configured",
        ),
    ];
    for (body, why) in cases {
        let file = write(tmp.path(), "vqa.json", &body.to_string());
        let cfg = VqaDataConfig {
            train_file: vec![file.clone()],
            test_file: Vec::new(),
            answer_list: None,
            vqa_root: root.0.clone(),
            vg_root: None,
            gqa_root: None,
            image_res: 32,
            max_tokens: 40,
            eos: "[SEP]".into(),
        };
        let (f, i, reason) = annotation_error(vqa::load_train(&cfg).unwrap_err());
        assert_eq!((f, i), (file, Some(1)));
        assert!(reason.contains(why), "{reason}");
    }
    let file = write(
        tmp.path(),
        "refcoco.json",
        &json!([{"image": "ok.jpg", "text": "the dog", "ref_id": 1},
                {"image": "ok.jpg", "text": "a cat", "ref_id": "x1"}])
        .to_string(),
    );
    let mut cfg = GroundingDataConfig {
        train_file: vec![file.clone()],
        test_file: Vec::new(),
        refcoco_data: Some(tmp.path().display().to_string()),
        det_file: None,
        image_root: root.0.clone(),
        image_res: 32,
        max_tokens: 40,
        careful_hflip: true,
        max_words: 30,
    };
    let (f, i, reason) =
        annotation_error(grounding::load_split(&cfg, &cfg.train_file).unwrap_err());
    assert_eq!((f, i), (file, Some(1)));
    assert!(reason.contains("`ref_id` must be an integer"), "{reason}");
    // A refs pickle that is not one: the error names it.
    std::fs::create_dir_all(tmp.path().join("refcoco+")).unwrap();
    std::fs::copy(
        case_dir().join("data/refcoco+/instances.json"),
        tmp.path().join("refcoco+/instances.json"),
    )
    .unwrap();
    std::fs::write(tmp.path().join("refcoco+/refs(unc).p"), b"\x80\x02]q\x00(").unwrap();
    let (f, _, reason) = annotation_error(cfg.refer().unwrap_err());
    assert!(f.ends_with("refs(unc).p"), "{f}");
    assert!(reason.contains("unreadable pickle"), "{reason}");
    cfg.refcoco_data = Some(case_dir().join("data").display().to_string());
    let refer = cfg.refer().unwrap();
    assert_eq!(
        refer.get(40).map(|r| r.bbox),
        Some([40.5, 10.0, 30.0, 40.25])
    );
}

/// RefCOCO+ evaluation inputs that the grounding evaluation cannot score (an expression whose
/// `ref_id` is unknown or in a training split, a box outside its image, an image without proposals
/// in `dets.json`, a `NaN` proposal as Python's `json.dump` writes it, a missing image): each is an
/// error naming the file, and the item where there is one, before any scoring starts.
#[test]
fn hostile_grounding_eval_inputs_name_file_and_item() {
    use xvlm_model::data::finetune::grounding::GroundingDataConfig;
    use xvlm_model::data::finetune::grounding_eval::GroundingEvalData;
    let tmp = tempfile::tempdir().unwrap();
    let fixture = case_dir().join("data/refcoco+");
    let refer_dir = tmp.path().join("refcoco+");
    std::fs::create_dir_all(&refer_dir).unwrap();
    std::fs::copy(fixture.join("refs(unc).p"), refer_dir.join("refs(unc).p")).unwrap();
    let instances: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("instances.json")).unwrap()).unwrap();
    std::fs::write(refer_dir.join("instances.json"), instances.to_string()).unwrap();
    let dets = fixture.join("dets.json").display().to_string();
    let val = json!({"image": "coco/alpha_d.png", "text": "cat on the table", "ref_id": 43});
    let config = |test_file: &str, det_file: &str| GroundingDataConfig {
        train_file: Vec::new(),
        test_file: vec![test_file.to_string()],
        refcoco_data: Some(tmp.path().display().to_string()),
        det_file: Some(det_file.to_string()),
        image_root: case_dir().join("images").display().to_string(),
        image_res: 32,
        max_tokens: 40,
        careful_hflip: true,
        max_words: 30,
    };
    let load = |cfg: &GroundingDataConfig| GroundingEvalData::load(cfg, tokenizer(), true);
    let good = write(tmp.path(), "good.json", &json!([val]).to_string());
    assert_eq!(
        load(&config(&good, &dets))
            .expect("the fixture's val split")
            .items
            .len(),
        1
    );

    let item_cases = [
        (
            json!({"image": "coco/alpha_d.png", "text": "a dog", "ref_id": 99}),
            "ref_id 99 is not in",
        ),
        (
            json!({"image": "coco/img_a.jpg", "text": "a dog", "ref_id": 40}),
            "not one of val / testA / testB",
        ),
        (
            json!({"image": "coco/nope.png", "text": "a dog", "ref_id": 43}),
            "nope.png",
        ),
    ];
    for (item, why) in item_cases {
        let file = write(tmp.path(), "val.json", &json!([val, item]).to_string());
        let (f, i, reason) = annotation_error(load(&config(&file, &dets)).err().expect("refused"));
        assert_eq!((f, i), (file, Some(1)), "{reason}");
        assert!(reason.contains(why), "{reason}");
    }

    let mut without_703: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("dets.json")).unwrap()).unwrap();
    without_703.as_object_mut().unwrap().remove("703");
    let no_proposals = write(tmp.path(), "dets.json", &without_703.to_string());
    let (f, i, reason) =
        annotation_error(load(&config(&good, &no_proposals)).err().expect("refused"));
    assert_eq!((f, i), (good.clone(), Some(0)));
    assert!(
        reason.contains("has no proposals in") && reason.contains(&no_proposals),
        "{reason}"
    );

    let nan = write(
        tmp.path(),
        "dets_nan.json",
        r#"{"703": [[1.0, NaN, 3.0, 4.0]]}"#,
    );
    let msg = load(&config(&good, &nan))
        .err()
        .expect("refused")
        .to_string();
    assert!(msg.contains("dets_nan.json"), "{msg}");

    let mut outside = instances;
    for ann in outside["annotations"].as_array_mut().unwrap() {
        if ann["id"] == 8003 {
            ann["bbox"] = json!([60.0, 20.0, 40.0, 40.0]);
        }
    }
    std::fs::write(refer_dir.join("instances.json"), outside.to_string()).unwrap();
    let (f, i, reason) = annotation_error(load(&config(&good, &dets)).err().expect("refused"));
    assert!(
        i == Some(0) || f.ends_with("instances.json"),
        "{f} {i:?} {reason}"
    );
    assert!(reason.contains("is not inside the 72x90 image"), "{reason}");
}

/// The VQA, NLVR2 and RefCOCO+ train sets of the fixture run through the map loader with their random
/// train transforms: shapes follow the collate functions, box targets stay inside the image.
#[test]
fn every_task_trains_through_the_map_loader() {
    use xvlm_model::data::finetune::grounding::{
        self, GroundingBoxTrainData, GroundingDataConfig, GroundingTrainData,
    };
    use xvlm_model::data::finetune::nlvr::NlvrData;
    use xvlm_model::data::finetune::vqa::{self, VqaDataConfig, VqaTrainData};
    use xvlm_model::data::finetune::{MapDataset, MapLoader, MapLoaderConfig};

    fn first<D: MapDataset>(data: D, batch: usize) -> D::Batch {
        let sampler = TrainSampler::new(data.len(), batch, 0, 1, 3).unwrap();
        let cfg = MapLoaderConfig {
            threads: 2,
            prefetch_batches: 1,
            seed: 3,
        };
        let mut loader =
            MapLoader::start(Arc::new(data), sampler, TrainCursor::default(), cfg).unwrap();
        loader.next_batch().unwrap().batch
    }
    let dir = case_dir();
    let tok = tokenizer();

    let cfg = VqaDataConfig::load(&dir.join("config_vqa.yaml")).unwrap();
    let entries = Arc::new(vqa::load_train(&cfg).unwrap());
    let b = first(VqaTrainData::new(entries, tok.clone(), &cfg), 2);
    let answers: i64 = b.k.iter().sum();
    assert_eq!(b.image.size(), [2, 3, 64, 64]);
    assert_eq!(b.answer_ids.size()[0], answers);
    assert_eq!(b.weights.size(), [answers]);
    assert!(b.text_ids.size()[1] <= cfg.max_tokens as i64);

    let cfg = NlvrDataConfig::load(&dir.join("config_nlvr.yaml")).unwrap();
    let entries = Arc::new(nlvr::load_split(&cfg, &cfg.train_file).unwrap());
    let b = first(
        NlvrData {
            entries,
            tokenizer: tok.clone(),
            transform: ImageTransform::train(cfg.image_res),
        },
        3,
    );
    assert_eq!(b.image0.size(), b.image1.size());
    assert_eq!(b.targets.size(), [3]);

    let cfg = GroundingDataConfig::load(&dir.join("config_grounding_bbox.yaml")).unwrap();
    let entries = Arc::new(grounding::load_split(&cfg, &cfg.train_file).unwrap());
    let b = first(
        GroundingTrainData::new(entries.clone(), tok.clone(), &cfg),
        4,
    );
    assert_eq!(b.image.size(), [4, 3, 64, 64]);
    assert_eq!(b.idx.size(), [4]);
    let refer = cfg.refer().unwrap();
    let b = first(
        GroundingBoxTrainData::new(entries, &refer, tok, &cfg).unwrap(),
        4,
    );
    assert_eq!(b.target_bbox.size(), [4, 4]);
    for row in Vec::<Vec<f32>>::try_from(&b.target_bbox).unwrap() {
        let [cx, cy, w, h] = [row[0], row[1], row[2], row[3]];
        assert!(w > 0.0 && h > 0.0, "{row:?}");
        assert!(
            cx - w / 2.0 >= -1e-6 && cx + w / 2.0 <= 1.0 + 1e-6,
            "{row:?}"
        );
        assert!(
            cy - h / 2.0 >= -1e-6 && cy + h / 2.0 <= 1.0 + 1e-6,
            "{row:?}"
        );
    }
}

/// Throughput of the retrieval train loader (official train transform at 384) on a folder made by
/// `xvlm synth-data --out DIR --width 640 --height 480`; run with
/// `XVLM_FINETUNE_BENCH=DIR cargo test --test finetune_data -- --ignored --nocapture`.
#[test]
#[ignore]
fn retrieval_loader_throughput() {
    let Ok(dir) = std::env::var("XVLM_FINETUNE_BENCH") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let set = Arc::new(
        RetrievalTrainSet::load(
            &[dir
                .join("finetune/retrieval_train.json")
                .display()
                .to_string()],
            &ImageRoot(dir.display().to_string()),
            30,
        )
        .unwrap(),
    );
    let tok = Arc::new(TextTokenizer::from_vocab_txt(&dir.join("vocab.txt")).unwrap());
    for threads in [1usize, 2] {
        let data = RetrievalTrainData {
            set: set.clone(),
            tokenizer: tok.clone(),
            transform: ImageTransform::train(384),
            truncate_to: Some(40),
        };
        let mut opts = RetrievalLoaderOptions::new(8, 0, 1, 1);
        opts.threads = threads;
        let mut loader = RetrievalTrainLoader::start(data, opts, TrainCursor::default()).unwrap();
        let t0 = std::time::Instant::now();
        let batches = 24;
        for _ in 0..batches {
            loader.next_batch().unwrap();
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "threads {threads}: {:.0} images/s ({batches} batches of 8 at 384)",
            (batches * 8) as f64 / secs
        );
    }
}
