"""The paper: its numbers (:mod:`.numbers`, pure data), the Table 1 reproduction harness (:mod:`.harness`)
and the Fig. 2/3 plots (:mod:`.plots`)."""
