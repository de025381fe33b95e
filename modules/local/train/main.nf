/*
 * TRAIN: one classifier per cell type from the label files, with cross-validated metrics and
 * the acceptance check (accuracy >= 0.75, precision and recall >= 0.70).
 */
process TRAIN {
    tag "${labels.size()} label files"
    label 'process_medium'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    path cells
    path labels, arity: '1..*', stageAs: 'labels??/*'

    output:
    path 'classifiers', emit: classifiers
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress train ${cells} ${labels} ${args} --out classifiers

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    mkdir -p classifiers
    touch classifiers/metrics.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
