"""CUB-200-2011 birds (Wah et al., 2011) with Reed et al.'s captions (CVPR 2016).

Layout (``data.root`` holds both trees, or is the parent of a ``CUB/``, ``cub/``, ``birds/`` or
``CUB_200_2011/`` folder holding them)::

    CUB_200_2011/images/<NNN.Name>/<stem>.jpg          pictures, from CUB_200_2011.tgz (11,788, 200 classes)
    cvpr2016_cub/text_c10/<NNN.Name>/<stem>.txt        10 captions per picture, from Reed's cvpr2016_cub.tar.gz
    cvpr2016_cub/trainvalclasses.txt, testclasses.txt  150 / 50 class folder names, one per line

Class id = int(NNN) - 1. ``cvpr2016_cub/images/*.t7`` are CNN features and are ignored. Splits, checks and
messages: `xmr.data.formats.reed_captions`.
"""

from __future__ import annotations

from xmr.data.formats import common
from xmr.data.formats.reed_captions import ReedCaptions

NAME = "cub"
CAPTIONS = "cvpr2016_cub"
LAYOUT = common.Layout(NAME, files=(f"{CAPTIONS}/trainvalclasses.txt",),
                       subdirs=("CUB", "cub", "birds", "CUB_200_2011"))

read = ReedCaptions(
    layout=LAYOUT,
    captions=CAPTIONS,
    captions_archive="cvpr2016_cub.tar.gz (Reed et al., CVPR 2016 captions)",
    # "images": a captions tree extracted inside CUB_200_2011/ (then the dataset folder is CUB_200_2011)
    pictures=("CUB_200_2011/images", "images"),
    pictures_archive="CUB_200_2011.tgz (Caltech-UCSD Birds-200-2011)",
    class_pattern=r"(\d+)\.\S+",
    example_class="001.Black_footed_Albatross",
    pictures_per_class=True,
)
