"""The README's main job runs end to end (shortened)."""
import json

from launcher.demo import lr_at, main


def test_demo_trains_transitions_and_exports(tmp_path, capsys):
    summary = main(["--steps", "9", "--batch", "16", "--train-size", "64", "--val-size", "32",
                    "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "theoretical training speed-up" in printed and "strict=True" in printed
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["toe/stage"] for r in records] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [r["toe/kept_tokens"] for r in records[::3]] == [32, 48, 64]
    assert 0.0 <= summary["val_top1"] <= 1.0
    assert (tmp_path / "model.pth").exists()


def test_lr_is_a_pure_function_of_the_step():
    assert lr_at(0, 100, 1e-3, 10) == 1e-4
    assert lr_at(9, 100, 1e-3, 10) == 1e-3
    assert abs(lr_at(99, 100, 1e-3, 10) - 1e-5) < 1e-6
