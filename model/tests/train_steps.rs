//! The official `Pretrain.train` loop, replayed: 5 iterations (region + image-text steps) of the tiny
//! model must reproduce the fixture's per-step losses, learning rates and grad norms (1e-5 relative),
//! the official param groups, and the final weights (1e-4 relative; attention key biases absolute).

use xvlm_model::parity::WeightsSource;
use xvlm_model::train::run_train_steps_case;

#[test]
fn pretrain_train_steps_fixture() {
    let dir = xvlm_model::fixtures_dir().join("pretrain_train_steps");
    let rows = run_train_steps_case(&dir, WeightsSource::Safetensors).unwrap();
    let mut worst_final: (f64, String) = (0.0, String::new());
    let mut worst_key_bias: (f64, String) = (0.0, String::new());
    for row in &rows {
        if !row.name.starts_with("final.") {
            println!("{row}");
        } else if row.name.ends_with("(abs)") {
            if row.max_abs > worst_key_bias.0 {
                worst_key_bias = (row.max_abs, row.name.clone());
            }
        } else if row.max_rel > worst_final.0 {
            worst_final = (row.max_rel, row.name.clone());
        }
    }
    println!(
        "worst final weight (relative): {:.3e} {}",
        worst_final.0, worst_final.1
    );
    println!(
        "worst key bias (absolute): {:.3e} {}",
        worst_key_bias.0, worst_key_bias.1
    );
    println!("{} rows", rows.len());
    let failures: Vec<String> = rows
        .iter()
        .filter(|r| !r.passed)
        .map(ToString::to_string)
        .collect();
    assert!(rows.len() > 200, "only {} rows", rows.len());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
