import json
import os
import subprocess
import sys
import zipfile

import pytest

from classifiers.commands import Progress
from gateway.cli import main
from tests.classifiers import generated

MAILGATE = os.path.join(os.path.dirname(sys.executable), "mailgate")


def mailgate(*args, cwd=None):
    return subprocess.run([MAILGATE, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "MAILGATE_CONFIG": ""})


class Ran:
    def __init__(self, returncode, out, err):
        self.returncode, self.stdout, self.stderr = returncode, out, err


def in_process(capsys, *args):
    """The same CLI entry point without a new interpreter (for the cheap cases)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return Ran(code, out, err)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Spam in a Maildir, ham in an mbox plus loose files; a config naming the model."""
    root = tmp_path_factory.mktemp("corpus")
    data = generated.corpus(21, 40, 40)
    spam = [raw for label, raw in data if label == 1]
    ham = [raw for label, raw in data if label == 0]
    dirs = {
        "spam": generated.write_maildir(str(root / "spam"), spam),
        "ham_mbox": generated.write_mbox(str(root / "ham.mbox"), ham[:30]),
        "ham_files": generated.write_files(str(root / "ham"), ham[30:]),
        "root": str(root),
    }
    model = root / "var" / "bayes.model"
    cfg = root / "mailgate.toml"
    cfg.write_text(f'[bayes]\nmodel = "{model}"\nmin_spam = 10\nmin_ham = 10\n')
    dirs["config"], dirs["model"] = str(cfg), str(model)
    return dirs


def test_train_writes_the_configured_model_and_summarises(folders):
    p = mailgate("train", "-c", folders["config"], "--spam", folders["spam"],
                 "--ham", folders["ham_mbox"], folders["ham_files"])
    assert p.returncode == 0, p.stderr
    assert "trained on 40 spam and 40 ham" in p.stdout
    assert folders["model"] in p.stdout
    meta = json.loads(zipfile.ZipFile(folders["model"]).read("meta.json"))
    assert (meta["spam"], meta["ham"], meta["learned_messages"]) == (40, 40, 80)
    assert p.stderr == ""  # no progress bar when not on a terminal


def test_train_with_output_option_and_duplicates(folders, tmp_path, capsys):
    out = str(tmp_path / "other.model")
    p = in_process(capsys, "train", "-c", folders["config"], "--spam", folders["spam"], folders["spam"],
                 "--ham", folders["ham_files"], "-o", out)
    assert p.returncode == 0, p.stderr
    assert "trained on 40 spam and 10 ham" in p.stdout and "skipped 40 duplicate(s)" in p.stdout
    assert "note: the gateway uses the model only from 10 spam and 10 ham" not in p.stdout
    assert os.path.exists(out)


def test_learn_counts_once_and_moves_the_other_way(folders, tmp_path, capsys):
    model = str(tmp_path / "learn.model")
    assert in_process(capsys, "train", "-c", folders["config"], "--spam", folders["spam"],
                      "--ham", folders["ham_mbox"], "-o", model).returncode == 0
    new = generated.write_files(str(tmp_path / "new"), [raw for _, raw in generated.corpus(22, 3, 0)])
    p = mailgate("learn", "-c", folders["config"], "-m", model, "--spam", new)
    assert p.returncode == 0, p.stderr
    assert "learned 3 new message(s) as spam; 0 moved from ham; 0 already learned as spam" in p.stdout
    assert "now 43 spam, 30 ham" in p.stdout
    p = in_process(capsys, "learn", "-c", folders["config"], "-m", model, "--spam", new)
    assert "learned 0 new message(s) as spam; 0 moved from ham; 3 already learned as spam" in p.stdout
    assert "now 43 spam, 30 ham" in p.stdout
    p = in_process(capsys, "learn", "-c", folders["config"], "-m", model, "--ham", new)
    assert "learned 0 new message(s) as ham; 3 moved from spam" in p.stdout
    assert "now 40 spam, 33 ham" in p.stdout
    # a message trained in bulk is known too
    p = in_process(capsys, "learn", "-c", folders["config"], "-m", model, "--spam", folders["spam"])
    assert "40 already learned as spam" in p.stdout


def test_eval_cross_validates_and_prints_the_figures(folders):
    p = mailgate("eval", "-c", folders["config"], "--spam", folders["spam"],
                 "--ham", folders["ham_mbox"], folders["ham_files"], "--folds", "4")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for text in ("tested: 40 spam, 40 ham (4-fold cross-validation", "ham false positives:", "spam recall:",
                 "AUC:", "confusion: TP=", "P(spam) >=", "0.999", "per source", folders["ham_mbox"]):
        assert text in out, text


def test_eval_tests_the_model_file_on_test_folders(folders, tmp_path, capsys):
    model = str(tmp_path / "t.model")
    assert in_process(capsys, "train", "-c", folders["config"], "--spam", folders["spam"],
                      "--ham", folders["ham_mbox"], folders["ham_files"], "-o", model).returncode == 0
    data = generated.corpus(23, 10, 10)
    ts = generated.write_files(str(tmp_path / "ts"), [r for lab, r in data if lab == 1])
    th = generated.write_files(str(tmp_path / "th"), [r for lab, r in data if lab == 0])
    p = mailgate("eval", "-c", folders["config"], "-m", model, "--test-spam", ts, "--test-ham", th)
    assert p.returncode == 0, p.stderr
    assert "tested: 10 spam, 10 ham (model " in p.stdout
    p = in_process(capsys, "eval", "-c", folders["config"], "--spam", folders["spam"],
                   "--ham", folders["ham_files"], "--test-spam", ts, "--test-ham", th)
    assert p.returncode == 0 and "trained on 50 messages" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["train", "--spam", "/no/such/dir", "--ham", "/no/such/dir"], "/no/such/dir: no such file or directory"),
    (["eval", "--spam", "/tmp"], "give both --spam and --ham"),
    (["eval"], "give --spam and --ham"),
])
def test_bad_input_gives_one_clear_line(folders, args, message):
    p = mailgate(*args[:1], "-c", folders["config"], *args[1:])
    assert len(p.stderr.strip().splitlines()) == 1
    assert p.returncode == 2
    assert message in p.stderr and "Traceback" not in p.stderr


def test_train_without_ham_is_refused(folders, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    p = in_process(capsys, "train", "-c", folders["config"], "--spam", folders["spam"], "--ham", str(empty),
                 "-o", str(tmp_path / "m"))
    assert p.returncode == 2 and "found 40 spam and 0 ham" in p.stderr


def test_learn_refuses_a_damaged_model_naming_it(folders, tmp_path, capsys):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00not a model")
    p = mailgate("learn", "-c", folders["config"], "-m", str(bad), "--ham", folders["ham_files"])
    assert p.returncode == 2
    assert f"{bad}: not a MailGate Bayes model" in p.stderr and "Traceback" not in p.stderr
    p = in_process(capsys, "learn", "-c", folders["config"], "-m", str(tmp_path / "missing"),
                   "--ham", folders["ham_files"])
    assert p.returncode == 2 and "mailgate train" in p.stderr


class FakeTty:
    def __init__(self, tty):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_bar_only_on_a_terminal():
    tty = FakeTty(True)
    bar = Progress("reading", total=10, stream=tty)
    bar.step(5)
    bar.close()
    assert "[###############...............] 5/10" in tty.text and tty.text.endswith("\n")
    pipe = FakeTty(False)
    bar = Progress("reading", total=10, stream=pipe)
    bar.step(5)
    bar.close()
    assert pipe.text == ""
