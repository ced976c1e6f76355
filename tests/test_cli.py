"""The command line: a real run end to end, and every bad input giving a one-line error (exit 2)."""

import subprocess
import sys

import pytest


def mpqat(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mpqat", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "mpqat: error:" in result.stderr or "Error:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = mpqat("train", "--dataset", "breast-cancer", "--method", "uniform", "--w-bits", "4", "--a-bits", "4",
                   "--epochs", "3", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    return out


def test_train_writes_the_run_files(trained_run):
    for name in ("metrics.json", "checkpoint.pt", "recipe.yaml"):
        assert (trained_run / name).is_file()


def test_eval_reproduces_metrics(trained_run):
    result = mpqat("eval", str(trained_run))
    assert result.returncode == 0, result.stderr
    assert "matches_metrics_json=True" in result.stdout


def test_report_draws_plots(trained_run):
    result = mpqat("report", str(trained_run))
    assert result.returncode == 0, result.stderr
    assert (trained_run / "bits_heatmap.png").stat().st_size > 1000
    assert (trained_run / "report.md").is_file()


def test_existing_run_needs_force(trained_run):
    result = mpqat("train", "--dataset", "breast-cancer", "--epochs", "1", "--out", str(trained_run), "--quiet")
    assert_user_error(result, "--force")


def test_resume_with_another_recipe_is_refused(trained_run):
    result = mpqat("train", "--dataset", "breast-cancer", "--w-bits", "2", "--epochs", "3", "--out", str(trained_run),
                   "--resume", "--quiet")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--dataset", "no-such-data"], "unknown dataset"),
        (["--dataset", "breast-cancer", "--method", "magic"], "unknown method"),
        (["--dataset", "breast-cancer", "--w-bits", "0"], "w_bits=0"),
        (["--dataset", "breast-cancer", "--a-bits", "33"], "a_bits=33"),
        (["--dataset", "breast-cancer", "--set", "wbits=4"], "unknown key"),
        (["--dataset", "breast-cancer", "--set", "nonsense"], "KEY=VALUE"),
        (["--dataset", "breast-cancer", "--hidden", "a,b"], "--hidden"),
        (["--dataset", "breast-cancer", "--lr", "-1"], "lr"),
    ],
)
def test_bad_train_input(tmp_path, args, fragment):
    result = mpqat("train", *args, "--epochs", "1", "--out", str(tmp_path / "x"), "--quiet")
    assert_user_error(result, fragment)


def test_bad_recipe_files(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: uniform\nw_bits: [4\n")
    assert_user_error(mpqat("train", "--dataset", "breast-cancer", "--config", str(bad_yaml), "--out", str(tmp_path / "a")),
                      "not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("method: uniform\nw_bits: 4\nbanana: 1\n")
    assert_user_error(mpqat("train", "--dataset", "breast-cancer", "--config", str(unknown), "--out", str(tmp_path / "b")),
                      "banana")


def test_csv_with_missing_target(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("a,b,label\n1,2,x\n3,4,y\n5,6,x\n7,8,y\n")
    result = mpqat("train", "--dataset", str(csv), "--target", "nope", "--epochs", "1", "--out", str(tmp_path / "o"))
    assert_user_error(result, "nope")


def test_corrupt_checkpoint(trained_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    data = (broken / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    assert_user_error(mpqat("eval", str(broken)), "corrupt")


def test_eval_on_a_missing_run(tmp_path):
    assert_user_error(mpqat("eval", str(tmp_path / "nothing")), "not an mpqat run")


def test_train_with_pretraining_and_a_cosine_schedule(tmp_path):
    import json

    out = tmp_path / "run"
    result = mpqat("train", "--dataset", "breast-cancer", "--method", "uniform", "--epochs", "2", "--pretrain-epochs", "2",
                   "--pretrain-lr", "0.005", "--lr-schedule", "cosine", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    train = json.loads((out / "run.json").read_text())["train"]
    assert train["pretrain_lr"] == 0.005 and train["lr_schedule"] == "cosine"
    assert_user_error(mpqat("train", "--dataset", "breast-cancer", "--lr-schedule", "step", "--out", str(tmp_path / "x")),
                      "step")
