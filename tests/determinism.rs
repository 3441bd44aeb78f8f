//! The same seed and thread count give bit-identical training losses, run after run.
//!
//! Every parallel loop splits its work by sizes and the thread count only, and each output
//! element is computed by one task in a fixed order, so nothing depends on which thread
//! finishes first. This test trains a small model for a few steps twice in fresh pools and
//! compares the loss bits.

use lego::Tensor;
use lego::model::{LegoConfig, LegoTransformer};
use lego::optim::{AdamW, AdamWConfig};

fn train_losses(threads: usize) -> Vec<u32> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        // Large enough that the matrix products and attention really split across threads.
        let config = LegoConfig::new(300, 64, 2, 4, 172, 64);
        let model = LegoTransformer::new(config, &mut Tensor::rng(7)).unwrap();
        let mut opt = AdamW::new(model.params(), AdamWConfig::default());
        let (batch, seq) = (8, 64);
        let mut losses = Vec::new();
        for step in 0..4 {
            let ids: Vec<usize> = (0..batch * (seq + 1)).map(|i| (i * 31 + step * 17) % 300).collect();
            let (x, y): (Vec<usize>, Vec<usize>) = ids
                .chunks(seq + 1)
                .flat_map(|r| r[..seq].iter().copied().zip(r[1..].iter().copied()))
                .unzip();
            opt.zero_grad();
            let loss = model.forward(&x, batch).unwrap().cross_entropy(&y, None);
            loss.backward();
            opt.step();
            losses.push(loss.item().to_bits());
        }
        losses
    })
}

#[test]
fn same_seed_and_threads_give_bit_identical_losses() {
    for threads in [1, 2] {
        let first = train_losses(threads);
        let second = train_losses(threads);
        assert_eq!(first, second, "{threads} thread(s): losses differ between runs");
        // And training does something: the loss moves.
        assert_ne!(first[0], first[3]);
    }
}

#[test]
fn the_calibrated_threshold_is_bit_identical_run_after_run() {
    use lego::data::create_synthetic_data;
    use lego::train::compute_confidence_threshold;
    let threshold = || {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            let model =
                LegoTransformer::new(LegoConfig::new(300, 64, 2, 4, 172, 64), &mut Tensor::rng(3)).unwrap();
            let data = create_synthetic_data(4, 8, 64, 300, 5);
            compute_confidence_threshold(&model, &data, 0.5).unwrap().to_bits()
        })
    };
    assert_eq!(threshold(), threshold());
}
