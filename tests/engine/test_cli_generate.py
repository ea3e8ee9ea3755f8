"""`modelhive generate` end to end in-process: output matches the Python API; errors are one line."""

from modelhive import Hive, ModelSpec, SamplingParams
from modelhive.cli.main import main


def test_generate_prints_the_greedy_completion(capsys):
    rc = main(["generate", "--model", "preset:tiny-qwen2", "--prompt", "Hello", "--max-tokens", "6",
               "--device", "cpu", "--memory", "512MiB"])
    assert rc == 0
    hive = Hive([ModelSpec(name="m", source="preset:tiny-qwen2")], device="cpu", memory="512MiB")
    expected = hive.generate("m", ["Hello"], SamplingParams(max_tokens=6, temperature=0.0))[0].text
    assert capsys.readouterr().out == expected + "\n"


def test_generate_bad_source_is_one_line(capsys):
    assert main(["generate", "--model", "/no/such/dir", "--prompt", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not exist" in err and "Traceback" not in err
