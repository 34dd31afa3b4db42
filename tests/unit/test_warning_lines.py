"""ctxext's warnings on the command line: one ``warning: ...`` line; other packages' keep Python's form."""

from __future__ import annotations

import warnings

import ctxext
from ctxext.warning_lines import as_lines, is_ours


def test_our_user_warnings_become_one_line_and_others_keep_their_form(capsys):
    ours = ctxext.__file__
    with warnings.catch_warnings(record=True) as passed_on:  # what reaches Python's own display
        warnings.simplefilter("always")
        original = warnings.showwarning
        with as_lines():
            warnings.warn_explicit("too few candidates", UserWarning, ours, 7)
            warnings.warn_explicit("a library's note", UserWarning, "/elsewhere/lib.py", 3)
            warnings.warn_explicit("renamed", DeprecationWarning, ours, 9)
        assert warnings.showwarning is original, "restored after the block"
    assert capsys.readouterr().err == "warning: too few candidates\n"
    assert [(str(w.message), w.filename) for w in passed_on] == [
        ("a library's note", "/elsewhere/lib.py"),
        ("renamed", ours),
    ], "other packages' warnings, and ours that are not UserWarnings, keep Python's form"


def test_only_files_of_the_package_are_ours(tmp_path):
    assert is_ours(ctxext.__file__) and not is_ours(str(tmp_path / "ctxext" / "x.py")) and not is_ours("<string>")
