#!/usr/bin/env python3
"""Train the Catch Up ranking model on synthetic data and export it to ONNX.

Writes, next to this file:
  catchup-ranker.onnx         the model (float32 [batch, F] -> float32 [batch])
  catchup-ranker.json         the feature spec the worker reads (a contract)
  catchup-ranker.golden.jsonl pairs in the `rescorer score` input format with the score
                              Python onnxruntime gives, for the Rust parity test
  metrics.json                held-out metrics quoted in README.md

Usage: python models/train.py [--seed 7] [--train 400000] [--test 100000]
Requirements are pinned in models/requirements.txt. The run is deterministic for a seed.

Ground truth (documented in README.md, "Synthetic ground truth"):
  p(act) = sigmoid(z) * 0.5 ** (age_hours / half_life[reason])
  z = base[reason] + 2.2 * affinity + 0.55 * log1p(mutual_connections)
      + 0.45 * log1p(messages_90d) + 0.35 * log1p(member.sessions_7d)
      - 0.25 * log1p(member.connections) + 0.6 * candidate.profile_completeness
      + 0.5 * same_company
A member with many connections spreads attention thinner; mutual connections, recent messages and
affinity raise the chance to reconnect; reasons differ both in base rate and in how fast the moment
goes stale.
"""

import argparse
import json
import math
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "catchup-ranker"
VERSION = "1"

# Reason -> (base logit, half-life in hours). Unknown reasons are valid input: all reason
# one-hots are 0; the generator gives them the "other" row so the model learns that case too.
REASONS = {
    "job_change": (-1.0, 168.0),
    "promotion": (-1.3, 120.0),
    "work_anniversary": (-2.2, 48.0),
    "birthday": (-1.8, 24.0),
    "new_post": (-2.6, 12.0),
}
OTHER_REASON = (-2.8, 36.0)

# Feature spec, in input-column order. Transforms are applied by the worker; standardisation
# (mean/std) lives inside the ONNX graph so the spec stays in the small shared vocabulary.
FEATURES = [
    {"name": "sessions_7d", "source": "member", "default": 0.0, "transform": "log1p"},
    {"name": "connections", "source": "member", "default": 150.0, "transform": "log1p"},
    {"name": "profile_completeness", "source": "candidate", "default": 0.5, "transform": "identity"},
    {"name": "connections", "source": "candidate", "default": 150.0, "transform": "log1p"},
    {"name": "affinity", "source": "pair", "default": 0.0, "transform": "identity"},
    {"name": "mutual_connections", "source": "pair", "default": 0.0, "transform": "log1p"},
    {"name": "messages_90d", "source": "pair", "default": 0.0, "transform": "log1p"},
    {"name": "same_company", "source": "pair", "default": 0.0, "transform": "identity"},
] + [{"name": r, "source": "reason"} for r in REASONS] + [
    {"name": "age_hours", "source": "age_hours", "transform": "log1p"},
    {"name": "age_hours", "source": "age_hours", "transform": "identity"},
]
MAX_AGE_HOURS = 24 * 30


def sample_raw(rng, n):
    """Raw (untransformed) entity values, as producers would publish them."""
    reasons = list(REASONS) + ["other"]
    weights = np.array([0.25, 0.1, 0.2, 0.15, 0.25, 0.05])
    raw = {
        "member.sessions_7d": rng.poisson(rng.gamma(1.5, 3.0, n)).astype(np.float64),
        "member.connections": np.round(rng.lognormal(5.3, 1.0, n)),
        "candidate.profile_completeness": rng.beta(4.0, 2.0, n),
        "candidate.connections": np.round(rng.lognormal(5.3, 1.0, n)),
        "pair.affinity": rng.beta(1.5, 4.0, n),
        "pair.mutual_connections": np.round(rng.lognormal(2.0, 1.2, n)),
        "pair.messages_90d": rng.poisson(rng.gamma(0.6, 4.0, n)).astype(np.float64),
        "pair.same_company": (rng.random(n) < 0.2).astype(np.float64),
        "reason": rng.choice(reasons, n, p=weights),
        # Ages are spread log-uniformly over 0..30 days: young moments matter most.
        "age_hours": np.expm1(rng.uniform(0.0, math.log1p(MAX_AGE_HOURS), n)),
    }
    return raw


def ground_truth(raw):
    base = np.array([REASONS.get(r, OTHER_REASON)[0] for r in raw["reason"]])
    half = np.array([REASONS.get(r, OTHER_REASON)[1] for r in raw["reason"]])
    z = (
        base
        + 2.2 * raw["pair.affinity"]
        + 0.55 * np.log1p(raw["pair.mutual_connections"])
        + 0.45 * np.log1p(raw["pair.messages_90d"])
        + 0.35 * np.log1p(raw["member.sessions_7d"])
        - 0.25 * np.log1p(raw["member.connections"])
        + 0.6 * raw["candidate.profile_completeness"]
        + 0.5 * raw["pair.same_company"]
    )
    return 1.0 / (1.0 + np.exp(-z)) * np.power(0.5, raw["age_hours"] / half)


def transform(value, kind):
    """The worker's transform, computed in float64 then stored as float32 (as in Rust)."""
    if kind == "log1p":
        return np.log1p(np.maximum(value, 0.0))
    return value


def feature_matrix(raw):
    cols = []
    for f in FEATURES:
        if f["source"] == "reason":
            cols.append((raw["reason"] == f["name"]).astype(np.float64))
        elif f["source"] == "age_hours":
            cols.append(transform(raw["age_hours"], f["transform"]))
        else:
            cols.append(transform(raw[f"{f['source']}.{f['name']}"], f["transform"]))
    return np.stack(cols, axis=1).astype(np.float32)


def export_onnx(clf, mean, std, path):
    """Standardise -> (Gemm + ReLU)* -> Gemm -> Sigmoid -> flatten to [batch]."""
    nf = len(FEATURES)
    inits = [
        numpy_helper.from_array(mean.astype(np.float32), "x_mean"),
        numpy_helper.from_array(std.astype(np.float32), "x_std"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "x_mean"], ["x_centered"]),
        helper.make_node("Div", ["x_centered", "x_std"], ["h0"]),
    ]
    last = "h0"
    n_layers = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
        out = f"z{i + 1}"
        nodes.append(helper.make_node("Gemm", [last, f"w{i}", f"b{i}"], [out]))
        if i < n_layers - 1:
            nodes.append(helper.make_node("Relu", [out], [f"h{i + 1}"]))
            last = f"h{i + 1}"
        else:
            last = out
    nodes.append(helper.make_node("Sigmoid", [last], ["p"]))
    nodes.append(helper.make_node("Reshape", ["p", "flat_shape"], ["score"]))
    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", nf])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        producer_name="rescorer/models/train.py",
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    model.doc_string = f"{NAME} v{VERSION}: Catch Up act probability"
    onnx.checker.check_model(model)
    onnx.save(model, path)


def calibration(pred, truth, bins=10):
    """Expected calibration error of pred against the ground-truth probability, by pred decile."""
    edges = np.quantile(pred, np.linspace(0, 1, bins + 1))
    idx = np.clip(np.searchsorted(edges, pred, side="right") - 1, 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        m = idx == b
        if not m.any():
            continue
        mp, mt = float(pred[m].mean()), float(truth[m].mean())
        ece += m.mean() * abs(mp - mt)
        table.append({"bin": b, "mean_pred": round(mp, 5), "mean_truth": round(mt, 5), "n": int(m.sum())})
    return float(ece), table


def golden_pairs(rng, n):
    """Raw JSON pairs in `rescorer score` format, covering defaults, unknown reasons and clamps."""
    raw = sample_raw(rng, n)
    out = []
    as_of = 1_764_000_000_000
    for i in range(n):
        ents = {"member": {}, "candidate": {}, "pair": {}}
        for key, vals in raw.items():
            if "." not in key:
                continue
            ent, name = key.split(".", 1)
            # Leave some features out so their defaults are exercised.
            if rng.random() < 0.15:
                continue
            ents[ent][name] = float(vals[i])
        reason = str(raw["reason"][i])
        if reason == "other":
            reason = "endorsement"
        age_ms = int(raw["age_hours"][i] * 3_600_000)
        moment_ts = as_of - age_ms
        if i % 37 == 0:
            moment_ts = as_of + 3_600_000  # a moment "in the future": age clamps to 0
        out.append({
            "member": ents["member"],
            "candidate": ents["candidate"],
            "pair": ents["pair"],
            "reason": reason,
            "moment_ts": moment_ts,
            "as_of": as_of,
        })
    return out


def golden_features(pair):
    row = []
    for f in FEATURES:
        if f["source"] == "reason":
            row.append(1.0 if pair["reason"] == f["name"] else 0.0)
        elif f["source"] == "age_hours":
            age = max(0, pair["as_of"] - pair["moment_ts"]) / 3_600_000.0
            row.append(float(transform(np.float64(age), f["transform"])))
        else:
            v = pair[f["source"]].get(f["name"], f["default"])
            row.append(float(transform(np.float64(v), f["transform"])))
    return np.array(row, dtype=np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--train", type=int, default=400_000)
    ap.add_argument("--test", type=int, default=100_000)
    ap.add_argument("--golden", type=int, default=300)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    raw_tr, raw_te = sample_raw(rng, args.train), sample_raw(rng, args.test)
    p_tr, p_te = ground_truth(raw_tr), ground_truth(raw_te)
    y_tr = (rng.random(args.train) < p_tr).astype(np.int64)
    y_te = (rng.random(args.test) < p_te).astype(np.int64)
    x_tr, x_te = feature_matrix(raw_tr), feature_matrix(raw_te)

    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std < 1e-6] = 1.0
    clf = MLPClassifier(
        hidden_layer_sizes=(32, 16),
        activation="relu",
        alpha=1e-4,
        batch_size=512,
        learning_rate_init=2e-3,
        max_iter=40,
        early_stopping=True,
        n_iter_no_change=5,
        random_state=args.seed,
    )
    clf.fit((x_tr - mean) / std, y_tr)

    onnx_path = os.path.join(HERE, f"{NAME}.onnx")
    export_onnx(clf, mean, std, onnx_path)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    pred = sess.run(["score"], {"features": x_te})[0].astype(np.float64)
    sk = clf.predict_proba((x_te - mean) / std)[:, 1]
    assert np.max(np.abs(sk - pred)) < 1e-4, "ONNX export disagrees with the trained network"

    ece, table = calibration(pred, p_te)
    metrics = {
        "model": f"{NAME}:{VERSION}",
        "seed": args.seed,
        "train_rows": args.train,
        "test_rows": args.test,
        "epochs": int(clf.n_iter_),
        "hidden_layers": list(clf.hidden_layer_sizes),
        "parameters": int(sum(w.size + b.size for w, b in zip(clf.coefs_, clf.intercepts_))),
        "test_positive_rate": float(y_te.mean()),
        "auc_model": float(roc_auc_score(y_te, pred)),
        "auc_ground_truth": float(roc_auc_score(y_te, p_te)),
        "brier_model": float(np.mean((pred - y_te) ** 2)),
        "brier_ground_truth": float(np.mean((p_te - y_te) ** 2)),
        "mae_vs_ground_truth_probability": float(np.mean(np.abs(pred - p_te))),
        "ece_vs_ground_truth_probability": ece,
        "calibration_deciles": table,
    }

    # Decay must be in the model: the same pair, older, scores lower (checked per reason).
    decay = {}
    for r in REASONS:
        probe = {k: np.full(5, np.median(v)) for k, v in raw_te.items() if k not in ("reason", "age_hours")}
        probe["reason"] = np.array([r] * 5)
        probe["age_hours"] = np.array([0.0, 6.0, 24.0, 72.0, 240.0])
        s = sess.run(["score"], {"features": feature_matrix(probe)})[0]
        decay[r] = [round(float(v), 5) for v in s]
        assert all(s[i] > s[i + 1] for i in range(4)), f"score does not decay with age for {r}: {s}"
    metrics["decay_probe_ages_h"] = [0, 6, 24, 72, 240]
    metrics["decay_probe_scores"] = decay

    spec = {
        "name": NAME,
        "version": VERSION,
        "onnx": f"{NAME}.onnx",
        "input": "features",
        "output": "score",
        "features": FEATURES,
    }
    with open(os.path.join(HERE, f"{NAME}.json"), "w") as fh:
        json.dump(spec, fh, indent=2)
        fh.write("\n")

    g_rng = np.random.default_rng(args.seed + 1)
    pairs = golden_pairs(g_rng, args.golden)
    gx = np.stack([golden_features(p) for p in pairs])
    gs = sess.run(["score"], {"features": gx})[0]
    with open(os.path.join(HERE, f"{NAME}.golden.jsonl"), "w") as fh:
        for p, s in zip(pairs, gs):
            p["expected"] = float(s)
            fh.write(json.dumps(p, sort_keys=True) + "\n")

    with open(os.path.join(HERE, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=2)
        fh.write("\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "calibration_deciles"}, indent=2))


if __name__ == "__main__":
    main()
