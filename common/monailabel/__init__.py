"""MONAI Label integration: serve every bundle for annotation, train from the annotators' labels.

``python -m common.monailabel serve --studies DIR`` starts the server (:mod:`.server` adds clear HTTP
errors to MONAI Label's); :mod:`.app` is the app, :mod:`.bundles` the list of served models and how
their bundles' configs are read, :mod:`.infer`, :mod:`.train` and :mod:`.strategy` its tasks,
:mod:`.datastore` which saved images and labels belong to which model, :mod:`.regions` training patches
from regions labelled on whole slides, :mod:`.wsi` QuPath's tiled whole-slide inference,
:mod:`.transforms` saved labels as training targets.
"""
