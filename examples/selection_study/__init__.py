"""The selection-rule study beside the RVSE++ pipeline: the calibrated benchmark's presets, the
candidate rules, the side-by-side comparison and the study's protocol (docs: Results)."""
