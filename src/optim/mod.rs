//! Optimisation: [`AdamW`], global-norm gradient clipping, and a warm-up + cosine schedule.
//!
//! A training step reads:
//!
//! ```
//! use lego::{Tensor, optim::{AdamW, AdamWConfig, clip_grad_norm}};
//! let w = Tensor::from_vec(vec![1.0, -1.0], &[2]).requires_grad();
//! let mut opt = AdamW::new(vec![w.clone()], AdamWConfig { lr: 0.1, ..Default::default() });
//! for _ in 0..3 {
//!     opt.zero_grad();
//!     let loss = w.sqr().sum_all();      // forward
//!     loss.backward();                  // gradients into w
//!     clip_grad_norm(opt.params(), 1.0); // keep the step bounded
//!     opt.step();                       // update w
//! }
//! assert!(w.sqr().sum_all().item() < 2.0);
//! ```

pub mod adamw;
pub mod clip;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig, AdamWState};
pub use clip::clip_grad_norm;
pub use schedule::CosineSchedule;
