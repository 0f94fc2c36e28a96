//! ITC across ranks (quirk 2): with the features of two ranks gathered, the loss equals the full-batch loss
//! and only the local slice receives gradient — exactly the local rows of the full-batch gradient.

use tch::{Kind, Tensor};
use xvlm_model::collective::{Collective, CollectiveError};
use xvlm_model::loss::itc_loss;

/// Rank `rank` of a two-rank world whose other rank's tensors are fixed.
struct FakeTwoRanks {
    rank: usize,
    others: std::cell::RefCell<Vec<Tensor>>,
}

impl Collective for FakeTwoRanks {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        2
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) -> Result<(), CollectiveError> {
        unimplemented!()
    }
    fn all_gather(&self, t: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        let other = self.others.borrow_mut().remove(0);
        let mut v = vec![other];
        v.insert(self.rank, t.shallow_clone());
        Ok(v)
    }
    fn broadcast(&self, _t: &mut Tensor, _root: usize) -> Result<(), CollectiveError> {
        unimplemented!()
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

fn normalized(seed: i64, rows: i64) -> Tensor {
    tch::manual_seed(seed);
    let t = Tensor::randn([rows, 8], (Kind::Float, tch::Device::Cpu));
    &t / t.norm_scalaropt_dim(2, [-1i64].as_slice(), true)
}

#[test]
fn gathered_itc_equals_full_batch_with_local_gradient() {
    let temp = Tensor::from(0.07f32);
    let img = normalized(1, 6);
    let txt = normalized(2, 6);

    // Full batch on one process.
    let full_img = img.copy().set_requires_grad(true);
    let full_txt = txt.copy().set_requires_grad(true);
    let full = itc_loss(
        &xvlm_model::collective::SingleProcess,
        &full_img,
        &full_txt,
        &temp,
        None,
    )
    .unwrap();
    full.backward();

    // Rank 1 of 2 holds rows 3..6; rank 0's rows arrive through the gather.
    let local_img = img.narrow(0, 3, 3).copy().set_requires_grad(true);
    let local_txt = txt.narrow(0, 3, 3).copy().set_requires_grad(true);
    let world = FakeTwoRanks {
        rank: 1,
        others: std::cell::RefCell::new(vec![img.narrow(0, 0, 3), txt.narrow(0, 0, 3)]),
    };
    let gathered = itc_loss(&world, &local_img, &local_txt, &temp, None).unwrap();
    gathered.backward();

    assert!((gathered.double_value(&[]) - full.double_value(&[])).abs() < 1e-6);
    let want_img = full_img.grad().narrow(0, 3, 3);
    let want_txt = full_txt.grad().narrow(0, 3, 3);
    assert!(local_img.grad().allclose(&want_img, 1e-5, 1e-7, false));
    assert!(local_txt.grad().allclose(&want_txt, 1e-5, 1e-7, false));
}

#[test]
fn itc_with_idx_treats_equal_ids_as_positives() {
    let temp = Tensor::from(0.07f32);
    let img = normalized(3, 4);
    // Two texts per image, images duplicated: equal ids must share the soft target.
    let txt = normalized(4, 4);
    let idx = Tensor::from_slice(&[0i64, 0, 1, 1]);
    let got = itc_loss(
        &xvlm_model::collective::SingleProcess,
        &img,
        &txt,
        &temp,
        Some(&idx),
    )
    .unwrap()
    .double_value(&[]);
    let logits = img.matmul(&txt.tr()) / &temp;
    let targets = Tensor::from_slice(&[
        0.5f32, 0.5, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5,
    ])
    .view([4, 4]);
    let ce = |l: &Tensor| {
        -(l.log_softmax(1, Kind::Float) * &targets)
            .sum_dim_intlist(1, false, Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    };
    let want = (ce(&logits) + ce(&logits.tr())) / 2.0;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
}
