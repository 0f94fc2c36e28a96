//! The ITM hard-negative samplers: the real multinomial sampler follows the weights (chi-square test over
//! many draws), never draws a zeroed entry (the positives), and is a pure function of its seed; the replay
//! sampler returns the recorded indices.

use tch::Tensor;
use xvlm_model::loss::{MultinomialSampler, NegativeKind, NegativeSampler, ReplaySampler};

/// Upper 0.1% points of the chi-square distribution, by degrees of freedom 1..=5.
const CHI2_999: [f64; 5] = [10.828, 13.816, 16.266, 18.467, 20.515];

#[test]
fn multinomial_draws_follow_weights_and_skip_zeros() {
    // Rows like ITM weights: softmax + 1e-5 with the diagonal zeroed, plus an extra zero in row 2.
    let rows: [[f64; 5]; 3] = [
        [0.0, 0.4, 0.3, 0.2, 0.1],
        [0.05, 0.0, 0.05, 0.6, 0.3],
        [0.25, 0.25, 0.0, 0.0, 0.5],
    ];
    let flat: Vec<f32> = rows.iter().flatten().map(|&w| w as f32).collect();
    let weights = Tensor::from_slice(&flat).view([3, 5]);
    let mut sampler = MultinomialSampler::new(7);
    let draws = 20_000;
    let mut counts = [[0u32; 5]; 3];
    for _ in 0..draws {
        let picks: Vec<i64> =
            Vec::try_from(sampler.sample(&weights, NegativeKind::ImageForText)).unwrap();
        assert_eq!(picks.len(), 3);
        for (r, &j) in picks.iter().enumerate() {
            assert!(rows[r][j as usize] > 0.0, "row {r} drew zeroed entry {j}");
            counts[r][j as usize] += 1;
        }
    }
    for (r, row) in rows.iter().enumerate() {
        let total: f64 = row.iter().sum();
        let support: Vec<usize> = (0..5).filter(|&j| row[j] > 0.0).collect();
        let chi2: f64 = support
            .iter()
            .map(|&j| {
                let expected = draws as f64 * row[j] / total;
                let d = counts[r][j] as f64 - expected;
                d * d / expected
            })
            .sum();
        let critical = CHI2_999[support.len() - 2];
        assert!(
            chi2 < critical,
            "row {r}: chi2 {chi2:.2} >= {critical} (counts {:?})",
            counts[r]
        );
    }
}

#[test]
fn multinomial_sampler_is_a_function_of_its_seed() {
    let weights =
        Tensor::from_slice(&[0.0f32, 0.5, 0.5, 0.3, 0.0, 0.7, 0.2, 0.8, 0.0]).view([3, 3]);
    let draw = |seed| {
        let mut s = MultinomialSampler::new(seed);
        (0..50)
            .flat_map(|_| {
                Vec::<i64>::try_from(s.sample(&weights, NegativeKind::TextForImage)).unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(draw(3), draw(3));
    assert_ne!(draw(3), draw(4));
}

#[test]
fn replay_sampler_returns_the_recorded_indices() {
    let weights = Tensor::ones([3, 3], (tch::Kind::Float, tch::Device::Cpu));
    let mut s = ReplaySampler::new(
        Tensor::from_slice(&[2i64, 0, 1]),
        Tensor::from_slice(&[1i64, 2, 0]),
    );
    let img: Vec<i64> = Vec::try_from(s.sample(&weights, NegativeKind::ImageForText)).unwrap();
    let txt: Vec<i64> = Vec::try_from(s.sample(&weights, NegativeKind::TextForImage)).unwrap();
    assert_eq!(img, vec![2, 0, 1]);
    assert_eq!(txt, vec![1, 2, 0]);
}
