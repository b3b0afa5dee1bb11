"""lmlab: controlled language-model training experiments on WikiText-2.

The experiment template becomes a spec file; lmlab checks that only the declared variables
differ, runs every arm and seed, logs every metric the template names and writes the template
back filled in. Data flows one way: spec -> execute -> train -> store -> analysis -> report.
"""

__version__ = "0.1.0"
