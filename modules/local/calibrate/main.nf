/*
 * CALIBRATE: one tissue threshold pooled over every slide of the run (--tissue_calibration),
 * so PLAN finds tissue the same way on all slides of a cohort instead of per-slide Otsu.
 */
process CALIBRATE {
    tag "${slides.size()} slides"
    label 'process_medium'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    path slides, arity: '1..*', stageAs: 'slides??/*'

    output:
    path 'tissue_calibration.json', emit: calibration
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg calibrate-tissue ${slides} ${args} --out tissue_calibration.json

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    echo '{}' > tissue_calibration.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
