//! Fixture `relpos_resize`: the Swin relative-table resize equals scipy `interp2d(kind='cubic')` on the
//! official geometric grid (XVLM-REFERENCE.md §1.5, quirk 11) at the case tolerance.

use tch::Tensor;
use xvlm_model::checkpoint::interpolate_relative_pos_embed;
use xvlm_model::parity::{compare, Tolerance};

fn load(name: &str) -> Vec<(String, Tensor)> {
    let path = xvlm_model::fixtures_dir().join("relpos_resize").join(name);
    Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn relpos_resize_matches_scipy_interp2d() {
    let batch = load("batch.safetensors");
    let expected = load("expected.safetensors");
    let tol = Tolerance {
        rtol: 1e-5,
        atol: 1e-6,
    };
    let mut cases = 0;
    for (name, src) in &batch {
        let case = name.strip_suffix(".src").expect("batch names end in .src");
        let dst_window: i64 = case.rsplit("_to_w").next().unwrap().parse().unwrap();
        let dst_rows = (2 * dst_window - 1) * (2 * dst_window - 1);
        let got = interpolate_relative_pos_embed(src, dst_rows, name).unwrap();
        let want = &expected
            .iter()
            .find(|(n, _)| n == &format!("{case}.dst"))
            .unwrap()
            .1;
        let c = compare(case, &got, want, tol);
        println!("{c}");
        assert!(c.passed, "{c}");
        cases += 1;
    }
    assert_eq!(cases, 4);
}

#[test]
fn relpos_resize_same_size_is_identity_and_window2_is_refused() {
    let t = Tensor::randn([49, 3], tch::kind::FLOAT_CPU);
    let same = interpolate_relative_pos_embed(&t, 49, "t").unwrap();
    assert!(same.equal(&t));
    let tiny = Tensor::randn([9, 1], tch::kind::FLOAT_CPU);
    let err = interpolate_relative_pos_embed(
        &tiny,
        49,
        "layers.3.blocks.0.attn.relative_position_bias_table",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("relative_position_bias_table") && err.contains("too few"),
        "{err}"
    );
    let not_square = Tensor::randn([50, 1], tch::kind::FLOAT_CPU);
    assert!(interpolate_relative_pos_embed(&not_square, 81, "x").is_err());
}
