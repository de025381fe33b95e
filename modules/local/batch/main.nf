/*
 * BATCH: the tiles of every slide pooled, sampled (fraction, seed) and grouped into batches;
 * each batch_NNNN.parquet becomes one SEGMENT task.
 */
process BATCH {
    tag "${tiles.size()} slides"
    label 'process_single'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    path tiles, arity: '1..*', stageAs: 'tiles/*'

    output:
    path 'batches/batch_*.parquet', emit: batches
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg batch ${tiles} ${args} --out batches

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    mkdir -p batches
    touch batches/batch_0000.parquet batches/batch_0001.parquet

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
