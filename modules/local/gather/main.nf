/*
 * GATHER: every batch's cells joined into per-slide tables, cells kept by two tiles resolved,
 * summaries (counts, densities per mm² of tissue), QuPath GeoJSON and plots.
 */
process GATHER {
    tag "${batch_dirs.size()} batches"
    label 'process_high'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    path batch_dirs, arity: '1..*', stageAs: 'batches/*'
    path plans, arity: '1..*', stageAs: 'plans/*'

    output:
    path 'gathered', emit: gathered
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress gather ${batch_dirs} --plans plans ${args} --out gathered

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    mkdir -p gathered
    touch gathered/summary.csv
    echo '{"cells_kept": 1}' > gathered/gather.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
