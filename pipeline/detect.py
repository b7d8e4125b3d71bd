"""Detection: the vertebrae, disc levels and spinal hardware of one CT volume.

``detect(volume, config)`` is the one call the flow makes (see ``pipeline.study``). It
finds the vertebral bodies and disc levels (:mod:`pipeline.anatomy`), then the screws,
cages and rods among them (:mod:`pipeline.hardware`), and gathers everything it was unsure
of in ``Anatomy.notes`` for the report.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pipeline.anatomy import find_vertebrae
from pipeline.config import Config
from pipeline.hardware import MetalVoxels, find_cages, find_rods, find_screws, unexplained_metal_mm3
from pipeline.results import Anatomy
from pipeline.volume import Volume

OTHER_METAL_NOTE_MM3 = 200.0  # metal beyond this, not spinal hardware, earns a note


def detect(volume: Volume, config: Config) -> Anatomy:
    """Find vertebrae (top to bottom), disc levels, screws, cages and rods.

    Parameters
    ----------
    volume : Volume
        CT in HU with its LPS geometry (any slice order or direction).
    config : Config
        Thresholds (``metal_threshold_hu``, ``bone_threshold_hu``, ``peek_marker_inset_mm``).

    Returns
    -------
    Anatomy
        ``named_by_position`` is set (and a note says why) when the sacrum is not in view;
        notes also mention vertebrae left out at the edge of the scan and metal outside the
        spine that was not analysed (e.g. a hip prosthesis).
    """
    # the metal voxels (found once, shared by the hardware searches) do not depend on the
    # anatomy: they are collected in a second thread while the vertebrae are found (both
    # are mostly NumPy / SciPy passes over the volume that leave Python free)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusionct-metal") as pool:
        pending = pool.submit(MetalVoxels, volume, config.metal_threshold_hu)
        vertebrae, levels, by_position, notes = find_vertebrae(volume, config)
        metal = pending.result()
    notes = list(notes)
    screws = find_screws(volume, config, vertebrae, metal=metal)
    cages = find_cages(volume, config, vertebrae, levels, screws, metal=metal)
    rods = find_rods(volume, config, vertebrae, screws, metal=metal)
    other = unexplained_metal_mm3(volume, config, screws, cages, rods, metal=metal)
    if other > OTHER_METAL_NOTE_MM3:
        notes.append(f"metal outside the identified screws, cages and rods ({other / 1000.0:.1f} cm3: "
                     "e.g. a joint prosthesis, or hardware in a vertebra not analysed) was not analysed")
    if not vertebrae:
        notes.append("no vertebra found: nothing could be measured")
    return Anatomy(vertebrae=tuple(vertebrae), levels=tuple(levels), screws=tuple(screws),
                   cages=tuple(cages), rods=tuple(rods), named_by_position=by_position,
                   notes=tuple(notes))
