"""Training data: the HDF5 patch store (format, builder, reader), the embedded sample store and the sampler.

Modules: ``store`` (format constants, PatchStore reader, verify_store), ``builder`` and ``build_store`` (``edsr-dist build-store``),
``sample_store`` (the store built from scikit-image's bundled photos), ``sampler`` (TrainSampler), ``resize``
(bicubic resizing), ``skimage_benchmarks`` (benchmark-shaped folders from the same photos), ``images``
(which files are images, reading them, network output to 8-bit pixels). Nothing is imported here so that importing
the package stays cheap.
"""
