"""Every figure file records where it came from, and every table in README.md and docs/ is what
`experiments/figure_tables.py` makes from the committed figure files."""

import json
import pathlib
import sys

import pytest

from attn_jax.experiment import provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'experiments'))
import figure_tables  # noqa: E402


@pytest.mark.parametrize('path', sorted((ROOT / 'experiments' / 'figures').glob('*.json')),
                         ids=lambda p: p.name)
def test_every_figure_file_records_its_provenance(path):
  provenance.check(json.loads(path.read_text()).get('provenance'), str(path))


def test_committed_tables_equal_what_their_figure_files_make(capsys):
  assert figure_tables.main(['--check']) == 0, capsys.readouterr().err


def test_a_table_that_drifted_is_caught():
  page = '<!-- table:decode_speed -->\n| an old number |\n<!-- /table:decode_speed -->\n'
  assert figure_tables.update(page) != page
  assert figure_tables.update(figure_tables.update(page)) == figure_tables.update(page)
