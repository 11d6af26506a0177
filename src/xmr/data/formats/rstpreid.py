"""RSTPReid reader (Zhu et al., ACM MM 2021).

Layout: ``RSTPReid/imgs/<img_path>`` and ``data_captions.json``, a list of records
{id: int, img_path: str, captions: [str, str], split: train|val|test}. The root may be the RSTPReid folder
or its parent.
"""

from __future__ import annotations

from xmr.data.formats import common

NAME = "rstpreid"
FILES = ("data_captions.json",)
SUBDIRS = ("RSTPReid", "rstpreid", "RSTPReID")

# `val_fraction` and `seed` are unused (the file has a val split).
read = common.JsonRecordsFormat(common.Layout(NAME, FILES, SUBDIRS), common.Fields(image="img_path"))
