"""What spans processes: vocabulary shards of the lm_head or the logits, sequence groups, and the
one check both make that the ranks of a group agree."""
