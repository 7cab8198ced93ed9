"""Text data (jobs/data.py): a TSV file that is not UTF-8 is named in the error."""

from __future__ import annotations

import pytest


def test_utf16_data_file_names_the_file(tmp_path):
    from tensorlotr.jobs.data import read_tsv

    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"train\.tsv is not UTF-8 text"):
        read_tsv(tmp_path / "train.tsv")
