/*
 * BATCH: the tiles of every slide pooled, sampled (fraction, seed) and grouped into batches;
 * each batch_NNNN.parquet becomes one SEGMENT task, and batch_NNNN.slides.json names the
 * slides it reads (so that task stages only those). No tissue tile in any slide stops the
 * run here (bmseg batch --require-tissue exits 2 with the reason), instead of a SEGMENT step
 * with nothing to do.
 */
process BATCH {
    tag "${tiles.size()} slides"
    label 'process_single'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    path tiles, arity: '1..*', stageAs: 'tiles/*'

    output:
    path 'batches/batch_*.parquet', emit: batches
    path 'batches/batch_*.slides.json', emit: slide_lists
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress batch ${tiles} --require-tissue ${args} --out batches

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    // Both stub batches name every slide (PLAN's stub tables are named by slide id).
    def slide_ids = tiles.collect { table -> '"' + (table.name - '.tiles.parquet') + '"' }.sort().join(', ')
    """
    mkdir -p batches
    touch batches/batch_0000.parquet batches/batch_0001.parquet
    echo '[${slide_ids}]' > batches/batch_0000.slides.json
    echo '[${slide_ids}]' > batches/batch_0001.slides.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
