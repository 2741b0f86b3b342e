"""scripts/mutate.py's own bookkeeping: a snippet that moved is "stale", never "killed"."""


from tests.repo_scripts import load_script


def _mutate():
    return load_script("scripts/mutate.py")


def test_a_moved_snippet_is_stale_and_the_file_is_left_alone(tmp_path):
    m = _mutate()
    (tmp_path / "src").mkdir()
    target = tmp_path / "src" / "x.py"
    target.write_text("a = 1\n")
    gone = m.Mutation("moved", "src/x.py", "b = 2\n", "b = 3\n", ("tests/none.py",))
    missing_file = m.Mutation("file-gone", "src/y.py", "a = 1\n", "a = 2\n", ("tests/none.py",))
    assert m.mutate_one(tmp_path, gone, timeout=5).status == "stale"
    assert m.mutate_one(tmp_path, missing_file, timeout=5).status == "stale"
    assert target.read_text() == "a = 1\n"

