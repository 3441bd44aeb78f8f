//! Parity of every op, AdamW and gradient clipping with JAX (float64) references.
//!
//! Each op case in `tests/fixtures/ops/` holds float32 inputs, the reference output `out`, a
//! random upstream gradient `dout`, and `grad_<input>` = ∂(Σ out·dout)/∂input. The test
//! builds the inputs as leaves that require a gradient, runs our op, compares `out`, then
//! calls `out.backward_with(dout)` and compares the gradient left in each leaf. One test per
//! fixture file, named after it, so a failure names the op.
//!
//! Tolerance: `|got − want| <= 1e-6·rms(want) + 1e-5·|want|` (see `common`), for every op
//! and both outputs and gradients; measured, the worst comparison uses 0.18 of it. Only the
//! AdamW step check below sets its own, with its reason.
//! `cargo test --test parity_ops -- --nocapture` prints the errors of every comparison.

mod common;

use std::collections::BTreeSet;

use common::{Fixture, Tol};
use lego::Tensor;
use lego::optim::{AdamW, AdamWConfig, clip_grad_norm};

/// Runs the op case `tests/fixtures/ops/<case>.safetensors`: `inputs` (the names of the
/// differentiated inputs, in the order `op` takes them) become leaves; `op` computes `out`
/// from them (reading any ids or metadata from the fixture); `out` and every `grad_<input>`
/// are compared at the default tolerance (every op meets it; see the module doc).
fn op_case(case: &str, inputs: &[&str], op: impl FnOnce(&Fixture, &[Tensor]) -> Tensor) {
    let fx = Fixture::load(&format!("ops/{case}.safetensors"));

    // Every gradient in the file must be one we check: no input left out by mistake.
    let in_file: BTreeSet<&str> = fx.file.tensors.keys().filter_map(|k| k.strip_prefix("grad_")).collect();
    let checked: BTreeSet<&str> = inputs.iter().copied().collect();
    assert_eq!(in_file, checked, "{case}: differentiated inputs");

    let leaves: Vec<Tensor> = inputs.iter().map(|name| fx.leaf(name)).collect();
    let out = op(&fx, &leaves);
    fx.check_tensor("out", &out);

    out.backward_with(fx.values("dout").to_vec());
    for (name, leaf) in inputs.iter().zip(&leaves) {
        fx.check_grad(&format!("grad_{name}"), leaf, Tol::DEFAULT);
    }
}

/// One `#[test]` per op case, named after its fixture file, plus the list `OP_CASES` of them
/// all (held against the directory by `every_op_fixture_has_a_test`).
macro_rules! op_cases {
    ($( $case:ident ( $($input:literal),* ) => |$fx:ident, $x:ident| $body:expr; )*) => {
        $(
            #[test]
            fn $case() {
                op_case(stringify!($case), &[$($input),*], |$fx: &Fixture, $x: &[Tensor]| {
                    let _ = &$fx;
                    $body
                });
            }
        )*
        const OP_CASES: &[&str] = &[$(stringify!($case)),*];
    };
}

op_cases! {
    // ----- matmul ---------------------------------------------------------------------------
    matmul_2d("a", "b") => |fx, x| x[0].matmul(&x[1]);
    matmul_tb("a", "b") => |fx, x| x[0].matmul_t(&x[1]);
    matmul_ta("a", "b") => |fx, x| x[0].matmul_ex(&x[1], true, false);
    matmul_batched("a", "b") => |fx, x| x[0].matmul(&x[1]);
    matmul_bcast("a", "b") => |fx, x| x[0].matmul(&x[1]);

    // ----- broadcasting binary ops ----------------------------------------------------------
    add_same("x", "y") => |fx, x| x[0].add(&x[1]);
    add_lastdim("x", "y") => |fx, x| x[0].add(&x[1]);
    add_leading("x", "y") => |fx, x| x[0].add(&x[1]);
    add_col("x", "y") => |fx, x| x[0].add(&x[1]);
    sub_same("x", "y") => |fx, x| x[0].sub(&x[1]);
    sub_lastdim("x", "y") => |fx, x| x[0].sub(&x[1]);
    sub_leading("x", "y") => |fx, x| x[0].sub(&x[1]);
    sub_col("x", "y") => |fx, x| x[0].sub(&x[1]);
    mul_same("x", "y") => |fx, x| x[0].mul(&x[1]);
    mul_lastdim("x", "y") => |fx, x| x[0].mul(&x[1]);
    mul_leading("x", "y") => |fx, x| x[0].mul(&x[1]);
    mul_col("x", "y") => |fx, x| x[0].mul(&x[1]);
    div_same("x", "y") => |fx, x| x[0].div(&x[1]);
    div_lastdim("x", "y") => |fx, x| x[0].div(&x[1]);
    div_leading("x", "y") => |fx, x| x[0].div(&x[1]);
    div_col("x", "y") => |fx, x| x[0].div(&x[1]);
    add_scalar("x") => |fx, x| x[0].add_scalar(fx.meta("scalar"));
    mul_scalar("x") => |fx, x| x[0].mul_scalar(fx.meta("scalar"));

    // ----- unary ----------------------------------------------------------------------------
    exp("x") => |fx, x| x[0].exp();
    log("x") => |fx, x| x[0].log();
    silu("x") => |fx, x| x[0].silu();
    relu("x") => |fx, x| x[0].relu();
    tanh("x") => |fx, x| x[0].tanh();
    neg("x") => |fx, x| x[0].neg();
    sqr("x") => |fx, x| x[0].sqr();
    sqrt("x") => |fx, x| x[0].sqrt();

    // ----- reductions -----------------------------------------------------------------------
    sum_all("x") => |fx, x| x[0].sum_all();
    mean_all("x") => |fx, x| x[0].mean_all();
    sum_axis("x") => |fx, x| x[0].sum_axis(fx.meta("axis"), false);
    mean_axis("x") => |fx, x| x[0].mean_axis(fx.meta("axis"), false);
    mean_axis0("x") => |fx, x| x[0].mean_axis(fx.meta("axis"), false);

    // ----- layout ---------------------------------------------------------------------------
    permute("x") => |fx, x| x[0].permute(&fx.meta_list("axes"));
    transpose_last2("x") => |fx, x| {
        let r = x[0].rank();
        x[0].transpose(r - 2, r - 1)
    };
    narrow("x") => |fx, x| x[0].narrow(fx.meta("axis"), fx.meta("start"), fx.meta("len"));
    cat("x0", "x1", "x2") => |fx, x| Tensor::cat(&[&x[0], &x[1], &x[2]], fx.meta("axis"));

    // ----- transformer building blocks ------------------------------------------------------
    embedding("weight") => |fx, x| x[0].embedding(&fx.ids("ids"), fx.shape("ids"));
    rmsnorm("x", "weight") => |fx, x| x[0].rms_norm(&x[1], fx.meta("eps"));
    rmsnorm_wide("x", "weight") => |fx, x| x[0].rms_norm(&x[1], fx.meta("eps"));
    swiglu("a", "b") => |fx, x| Tensor::swiglu(&x[0], &x[1]);
    rope("x") => |fx, x| x[0].rope(fx.meta("offset"), fx.meta("theta"));
    rope_offset0("x") => |fx, x| x[0].rope(fx.meta("offset"), fx.meta("theta"));
    softmax("x") => |fx, x| {
        assert_eq!(fx.meta::<i64>("axis"), -1, "softmax: only the last axis is an op");
        x[0].softmax()
    };
    log_softmax("x") => |fx, x| {
        assert_eq!(fx.meta::<i64>("axis"), -1, "log_softmax: only the last axis is an op");
        x[0].log_softmax()
    };
    attention("q", "k", "v") => |fx, x| attention_checked(fx, x);
    attention_noprefix("q", "k", "v") => |fx, x| attention_checked(fx, x);
    attention_single("q", "k", "v") => |fx, x| attention_checked(fx, x);
    attention_masked("q", "k", "v") => |fx, x| {
        assert_eq!(x[1].dim(1) - x[0].dim(1), fx.meta::<usize>("prefix"), "attention prefix");
        let visible: std::sync::Arc<[bool]> = fx.ids("visible").iter().map(|&f| f == 1).collect();
        Tensor::attention_masked(&x[0], &x[1], &x[2], Some(&visible))
    };
    cross_entropy("logits") => |fx, x| x[0].cross_entropy(&fx.ids("targets"), None);
    cross_entropy_weighted("logits") =>
        |fx, x| x[0].cross_entropy(&fx.ids("targets"), Some(fx.values("weights")));
}

/// Our attention takes the cached prefix from the shapes (`kv_len − q_len`); make sure that
/// is the prefix the fixture was made with.
fn attention_checked(fx: &Fixture, x: &[Tensor]) -> Tensor {
    let (q, k, v) = (&x[0], &x[1], &x[2]);
    assert_eq!(k.dim(1) - q.dim(1), fx.meta::<usize>("prefix"), "attention prefix");
    Tensor::attention(q, k, v)
}

/// The file names (without `.safetensors`) in `tests/fixtures/<group>/`.
fn fixture_names(group: &str) -> BTreeSet<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(group);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter_map(|f| f.strip_suffix(".safetensors").map(str::to_string))
        .collect()
}

#[test]
fn every_op_fixture_has_a_test() {
    let tested: BTreeSet<String> = OP_CASES.iter().map(|s| s.to_string()).collect();
    assert_eq!(fixture_names("ops"), tested);
    assert_eq!(OP_CASES.len(), 54);
    let optim: BTreeSet<String> = ["adamw", "clip", "clip_noop"].map(String::from).into();
    assert_eq!(fixture_names("optim"), optim);
}

// ----- optim ---------------------------------------------------------------------------------

/// Three AdamW steps with the fixture's gradients g1, g2, g3, against PyTorch's update
/// (computed in float64): the parameter after each step, and the step itself.
#[test]
fn adamw_three_steps() {
    let fx = Fixture::load("optim/adamw.safetensors");
    let config = AdamWConfig {
        lr: fx.meta("lr"),
        beta1: fx.meta("beta1"),
        beta2: fx.meta("beta2"),
        eps: fx.meta("eps"),
        weight_decay: fx.meta("weight_decay"),
    };
    let param = fx.leaf("param");
    let mut opt = AdamW::new(vec![param.clone()], config);
    let mut want_before = fx.values("param").to_vec();
    for step in 1..=3 {
        // The loss Σ param·g has gradient exactly g.
        opt.zero_grad();
        let g = fx.tensor(&format!("g{step}"));
        param.mul(&g).sum_all().backward();
        assert_eq!(param.grad().unwrap(), g.to_vec(), "gradient fed to step {step}");

        let before = param.to_vec();
        opt.step();
        let after = param.to_vec();
        let want = format!("after{step}");
        fx.check(&want, param.shape(), &after);

        // The step alone (about lr = 1e-2 in size) is checked too: an error of 1e-5 relative
        // to the parameter would be 1e-3 relative to the step, enough to hide e.g. weight
        // decay applied after the update instead of before (a 1e-5 difference). Both steps
        // are differences of float32 numbers of order 1 (ulp 1.2e-7 to 2.4e-7), each
        // carrying up to ~2 ulps of rounding that has nothing to do with the update; hence
        // an absolute tolerance of 5e-5 of the step's RMS (~1e-2), i.e. 5e-7. Measured
        // worst: 1.2e-7 (one ulp).
        let got_step: Vec<f32> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let want_after = fx.values(&want);
        let want_step: Vec<f32> = want_after.iter().zip(&want_before).map(|(a, b)| a - b).collect();
        common::assert_close_tol(
            &format!("adamw step {step}"),
            &[want_step.len()],
            &got_step,
            &want_step,
            Tol { rtol: 1e-5, atol: 5e-5 },
        );
        want_before = want_after.to_vec();
    }
}

/// `clip_grad_norm` over two parameters whose gradients are the fixture's `a` and `b`.
fn clip_case(file: &str) {
    let fx = Fixture::load(file);
    let (ga, gb) = (fx.tensor("a"), fx.tensor("b"));
    let pa = Tensor::zeros(ga.shape()).requires_grad();
    let pb = Tensor::zeros(gb.shape()).requires_grad();
    // The loss Σ pa·a + Σ pb·b has gradients exactly a and b.
    pa.mul(&ga).sum_all().add(&pb.mul(&gb).sum_all()).backward();
    assert_eq!(pa.grad().unwrap(), ga.to_vec());
    assert_eq!(pb.grad().unwrap(), gb.to_vec());

    let norm = clip_grad_norm(&[pa.clone(), pb.clone()], fx.meta("max_norm"));
    fx.check("total_norm", &[], &[norm]);
    fx.check_grad("clipped_a", &pa, Tol::DEFAULT);
    fx.check_grad("clipped_b", &pb, Tol::DEFAULT);
}

#[test]
fn clip_grad_norm_clips() {
    clip_case("optim/clip.safetensors");
}

#[test]
fn clip_grad_norm_noop_below_max() {
    clip_case("optim/clip_noop.safetensors");
}
